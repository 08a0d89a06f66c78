"""The agent's Kafka publisher: acknowledged by Kafka, or fsynced to the spill, before a client hears OK.

One Kafka record is one OTLP Export request whose items share one partition key, split so that no
record exceeds ``producer.max_message_bytes``. The producer is idempotent with ``acks=all``; librdkafka
retries transient errors itself within ``message.timeout.ms``, which is set to the exporter's
``timeout`` so that a client never waits on an unreachable Kafka for longer than that: whatever is not
acknowledged by then goes to the spill and the replayer owns its redelivery (see replay.py for the
ordering rule). Counters: ``published`` counts every record Kafka acknowledged (direct or replayed),
``spilled`` the records written to the spill, ``replayed`` the spilled ones acknowledged later.

A record's Kafka timestamp is when the agent received its data (the batch it came in), not when it was
produced: it is kept through the spill, so a record replayed after an outage keeps its event time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from google.protobuf.message import Message as ProtoMessage

from agents.contracts import InvalidRequest, Unavailable
from agents.publish.replay import Replayer
from agents.publish.spill import Spill, SpillRecord
from agents.telemetry import AgentMetrics
from kotel.kafka.settings import KafkaSettings
from kotel.kafka.topics import TopicNames
from kotel.otlp import OtlpSizeError, Signal, split_wire
from kotel.resilience.breaker import BreakerState, CircuitBreaker
from kotel.topology.exporters import FileExporterConfig, KafkaExporterConfig

log = logging.getLogger(__name__)

SCHEMA = b"otlp-proto-v1"
# Room left in a record for its key, headers and Kafka's record framing when sizing a request part.
RECORD_OVERHEAD = 512
# librdkafka checks message timeouts about once a second; past this much extra, stop waiting for it.
_DELIVERY_GRACE = 2.0


def producer_config(kafka: KafkaSettings, exporter: KafkaExporterConfig) -> dict[str, Any]:
    """librdkafka options for the agent's producer (no callbacks: those are the sender's)."""
    conf = kafka.librdkafka_config()
    if exporter.brokers:
        conf["bootstrap.servers"] = ",".join(exporter.brokers)
    options = exporter.producer
    conf.update(
        {
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": options.compression,
            "linger.ms": options.linger.total_seconds() * 1000,
            "batch.num.messages": options.flush_max_messages,
            "message.max.bytes": options.max_message_bytes,
            "message.timeout.ms": max(1, round(exporter.timeout.total_seconds() * 1000)),
        }
    )
    return conf


class KafkaSender:
    """A confluent-kafka Producer made awaitable: a poll thread settles asyncio futures.

    librdkafka calls delivery and error callbacks from ``poll()``, here on a thread of our own, and
    they reach the event loop through ``loop.call_soon_threadsafe``.
    """

    def __init__(self, config: dict[str, Any], *, metrics: AgentMetrics, on_all_brokers_down: Any) -> None:
        self._config = config
        self._metrics = metrics
        self._on_all_brokers_down = on_all_brokers_down
        self._producer: Producer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._producer = Producer(
            {**self._config, "error_cb": self._on_error, "logger": logging.getLogger("kotel.librdkafka")}
        )
        self._thread = threading.Thread(target=self._poll, name="kotel-kafka-poll", daemon=True)
        self._thread.start()

    def close(self, timeout: float) -> int:
        """Flush (bounded), stop the poll thread; the number of records left undelivered."""
        left = 0
        if self._producer is not None:
            left = self._producer.flush(timeout)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return left

    async def send(self, records: Sequence[SpillRecord], timeout: float) -> list[SpillRecord]:
        """Produce in order, wait up to ``timeout`` (plus grace); the records not acknowledged."""
        assert self._producer is not None and self._loop is not None, "start() first"
        loop = self._loop
        futures: list[asyncio.Future[None]] = []
        deadline = loop.time() + timeout + _DELIVERY_GRACE
        for record in records:
            future: asyncio.Future[None] = loop.create_future()
            while not future.done():
                try:
                    self._producer.produce(record.topic, record.value, record.key.encode(),
                                           headers=list(record.headers), timestamp=record.created_ms,
                                           on_delivery=partial(self._on_delivery, future))
                    break
                except BufferError:  # librdkafka's queue is full: let the oldest delivery finish first
                    oldest = next((f for f in futures if not f.done()), None)
                    if oldest is None or loop.time() >= deadline:
                        future.set_exception(_Failed("_QUEUE_FULL"))
                    else:
                        await asyncio.wait([oldest], timeout=deadline - loop.time())
                except KafkaException as exc:
                    future.set_exception(_Failed(exc.args[0].name()))
            futures.append(future)
        if futures:
            await asyncio.wait(futures, timeout=max(0.0, deadline - loop.time()))
        failed: list[SpillRecord] = []
        for record, future in zip(records, futures, strict=True):
            if not future.done():
                future.cancel()
                error = "_DELIVERY_WAIT_EXPIRED"
            elif future.exception() is None:
                self._metrics.published.labels(record.signal).inc()
                continue
            else:
                error = str(future.exception())
            self._metrics.publish_errors.labels(error).inc()
            failed.append(record)
        return failed

    async def metadata_ok(self, timeout: float) -> bool:
        assert self._producer is not None
        try:
            await asyncio.to_thread(self._producer.list_topics, timeout=timeout)
        except KafkaException:
            return False
        return True

    def _poll(self) -> None:
        assert self._producer is not None
        while not self._stop.is_set():
            self._producer.poll(0.1)

    def _on_delivery(self, future: asyncio.Future[None], err: KafkaError | None, _msg: Message) -> None:
        self._call_soon(_settle, future, err)

    def _on_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            log.warning("Kafka: all brokers are down (%s); opening the circuit breaker", err.str())
            self._call_soon(self._on_all_brokers_down)
        elif err.fatal():
            log.error("Kafka producer fatal error: %s", err.str())
        else:
            log.debug("Kafka: %s", err.str())

    def _call_soon(self, callback: Any, *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self._loop.call_soon_threadsafe(callback, *args)


class _Failed(Exception):
    """A delivery error, by librdkafka's name for it (the publish_errors label)."""


def _settle(future: asyncio.Future[None], err: KafkaError | None) -> None:
    if future.done():  # gave up waiting on it already
        return
    if err is None:
        future.set_result(None)
    else:
        future.set_exception(_Failed(err.name()))


class Publisher:
    """The agent's durable sink: ``publish()`` returns once Kafka or the spill holds the data."""

    def __init__(
        self,
        kafka: KafkaSettings,
        exporter: KafkaExporterConfig,
        spill: FileExporterConfig,
        *,
        agent_id: str,
        prefix: str = "kotel",
        metrics: AgentMetrics | None = None,
        max_open_seconds: float = 10.0,
    ) -> None:
        self.metrics = metrics or AgentMetrics()
        self._exporter = exporter
        self._agent = agent_id.encode()
        self._topics = TopicNames(prefix)
        self._timeout = exporter.timeout.total_seconds()
        self._retry_after = exporter.backpressure.retry_after.total_seconds()
        self.breaker = CircuitBreaker(exporter.circuit_breaker, on_change=self._breaker_changed)
        self.spill = Spill(spill, metrics=self.metrics, retry_after=self._retry_after,
                           max_open_seconds=max_open_seconds)
        self._sender = KafkaSender(producer_config(kafka, exporter), metrics=self.metrics,
                                   on_all_brokers_down=self.breaker.trip)
        self._replayer = Replayer(self.spill, self._sender, self.breaker, exporter.retry_on_failure,
                                  timeout=self._timeout, metrics=self.metrics)
        self._seq = itertools.count()
        self._tails: dict[str, asyncio.Future[None]] = {}  # per key: the latest publish's placement
        self._diverting = 0  # publishes headed for the spill that have not submitted yet
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False

    async def start(self) -> None:
        """Recover the spill (its parts are replayed first), connect, start replaying."""
        await asyncio.to_thread(self.spill.open)
        # Microseconds since the epoch: increasing across restarts without state; never below the spill's.
        self._seq = itertools.count(max(time.time_ns() // 1000, self.spill.max_seq + 1))
        self._sender.start(asyncio.get_running_loop())
        self._replayer.start()

    async def close(self, timeout: float = 10.0) -> None:
        """Refuse new publishes, let those under way finish (bounded), flush and stop."""
        self._closing = True
        await self._replayer.stop()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.warning("publisher closed with %d publishes still under way", self._active)
        await self.spill.close()
        left = await asyncio.to_thread(self._sender.close, timeout)
        if left:
            log.warning("%d Kafka records were still undelivered at shutdown", left)

    async def __aenter__(self) -> Publisher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def publish(self, signal: Signal | str, key: str, tenant: str, request: ProtoMessage) -> None:
        """Publish a request message (see publish_wire)."""
        if not getattr(request, Signal(signal).resource_field):
            return
        await self.publish_wire(signal, key, tenant, request.SerializeToString())

    async def publish_wire(self, signal: Signal | str, key: str, tenant: str, wire: bytes) -> None:
        """Return once every record is acknowledged by Kafka or fsynced to the spill.

        Raises InvalidRequest when one item alone exceeds the record size limit, Unavailable when
        neither Kafka nor the spill can take the data (spill full: backpressure; or shutting down).
        """
        if self._closing:
            raise Unavailable("the agent is shutting down", self._retry_after, reason="shutdown")
        records = self._records(Signal(signal), key, tenant, wire)
        if not records:
            return
        size = sum(len(r.value) for r in records)
        self.metrics.in_flight_bytes.inc(size)
        self._active += 1
        self._idle.clear()
        # Chain this publish behind the previous one for the key, so spill order follows call order.
        placed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        previous = self._tails.get(key)
        self._tails[key] = placed
        try:
            if self._diverting == 0 and self.spill.is_empty and self.breaker.allow():
                records = await self._sender.send(records, self._timeout)
                if not records:
                    self.breaker.record_success()
                    return
                self.breaker.record_failure()
            await self._divert(records, previous, placed)
        finally:
            if not placed.done():
                placed.set_result(None)
            if self._tails.get(key) is placed:
                del self._tails[key]
            self.metrics.in_flight_bytes.dec(size)
            self._active -= 1
            if not self._active:
                self._idle.set()

    async def _divert(self, records: list[SpillRecord], previous: asyncio.Future[None] | None,
                      placed: asyncio.Future[None]) -> None:
        self._diverting += 1
        try:
            if previous is not None and not previous.done():
                await asyncio.shield(previous)  # an earlier publish for the key goes first
            committed = self.spill.submit(records)
        finally:
            self._diverting -= 1
            placed.set_result(None)
        await committed

    def _records(self, signal: Signal, key: str, tenant: str, wire: bytes) -> list[SpillRecord]:
        if not wire:
            return []
        topic = self._exporter.topic or self._topics.raw(signal)
        fixed = (("kotel.tenant", tenant.encode()), ("kotel.signal", signal.value.encode()),
                 ("kotel.schema", SCHEMA), ("kotel.agent", self._agent))
        headroom = RECORD_OVERHEAD + len(key.encode()) + sum(len(k) + len(v) for k, v in fixed) + 30
        limit = self._exporter.producer.max_message_bytes
        created_ms = time.time_ns() // 1_000_000  # the batch's time: its records' Kafka timestamp
        try:
            parts = split_wire(signal, wire, limit - headroom)
        except OtlpSizeError as exc:
            message = f"{exc} (producer.max_message_bytes is {limit})"
            raise InvalidRequest(message, reason="too_large") from None
        out = []
        for part in parts:
            seq = next(self._seq)
            headers = (*fixed, ("kotel.seq", str(seq).encode()))
            out.append(SpillRecord(seq, signal.value, topic, key, tenant, headers, part, created_ms))
        return out

    def _breaker_changed(self, state: BreakerState) -> None:
        self.metrics.breaker_open.set(0 if state is BreakerState.CLOSED else 1)
        log.info("Kafka circuit breaker %s", state.value)
