"""The shape every sink shares: consume tenant topics, deliver, commit only what the backend accepted.

A sink is a consumer group per exporter. Records are delivered in batches; each record comes back
OK, RETRY or PERMANENT. Permanent failures go to the dead-letter topic with the reason (and count as
handled); retryable ones are retried with backoff, and when the circuit breaker opens the sink pauses
its partitions — Kafka keeps the backlog, the sink's memory does not grow — and probes again after
``open_duration``. Offsets are committed (in order) after a batch is fully handled, never before; the
commit is sent as the next poll begins, its answer not waited for (the last one is). Records fetched again
because a commit failed (broker out of reach, rebalance) are skipped when this process handled them already
(`redelivery.HandledOffsets`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kotel.gc_pauses import PauseHistogram
from kotel.kafka.deadletter import dead_letter_headers
from kotel.kafka.topics import TopicNames
from kotel.resilience import Backoff, CircuitBreaker
from kotel.ticks import next_tick
from kotel.topology import Topology
from kotel.topology.exporters import CircuitBreakerConfig, RetryConfig
from streams.sinks.redelivery import HandledOffsets

log = logging.getLogger("kotel.sink")


class Outcome(enum.Enum):
    OK = "ok"
    RETRY = "retry"
    PERMANENT = "permanent"


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    reason: str = ""
    retry_after: float = 0.0


OK = Result(Outcome.OK)


@dataclass(frozen=True, slots=True)
class SinkRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    tenant: str
    signal: str
    timestamp_ms: int


# The period of the ticks a sink waits for after a batch's first record, gathering more before delivering
# (fewer, larger requests under load; a short period keeps the pipeline's latency at a few ms when quiet).
DEFAULT_LINGER_SECONDS = 0.005
LAG_INTERVAL_SECONDS = 2.0  # between updates of the lag gauge (from cached watermarks: no request)


class Deliverer(Protocol):
    """A backend: ``deliver`` answers one Result per record, in order; an optional ``linger`` attribute
    (seconds) overrides `DEFAULT_LINGER_SECONDS`."""

    name: str
    signals: tuple[str, ...]

    async def deliver(self, records: Sequence[SinkRecord]) -> list[Result]: ...

    async def close(self) -> None: ...


class SinkMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.gc_pauses = PauseHistogram("kotel_sink_gc_pause_seconds", r)
        self.exported = Counter("kotel_sink_exported_records", "Records the backend accepted",
                                ["sink", "tenant", "signal"], registry=r)
        self.retried = Counter("kotel_sink_retried_records", "Record deliveries retried", ["sink", "reason"],
                               registry=r)
        self.dead_lettered = Counter("kotel_sink_dead_lettered_records", "Records refused for good",
                                     ["sink", "reason"], registry=r)
        self.lag = Gauge("kotel_sink_consumer_lag", "Records behind the end of the partition",
                         ["sink", "topic", "partition"], registry=r)
        self.paused = Gauge("kotel_sink_paused", "1 while the breaker holds the partitions paused", ["sink"],
                            registry=r)
        self.latency = Histogram("kotel_sink_delivery_seconds", "One deliver() call", ["sink"], registry=r)
        self.redelivered = Counter("kotel_sink_redelivered_skipped_records", "Records fetched again after a "
                                   "failed commit and skipped: this process had delivered them", ["sink"],
                                   registry=r)


def sink_topics(topology: Topology, sink: str, signals: Sequence[str]) -> list[str]:
    """The tenant topics routed to ``sink`` (and the unrouted ones when it is a default exporter)."""
    names = TopicNames(topology.topics.prefix)
    routing = topology.gateway.routing if topology.gateway else None
    if routing is None:
        return []
    topics = [
        names.tenant(route.value, s) for route in routing.table if sink in route.exporters for s in signals
    ]
    if sink in routing.default_exporters:
        topics += [names.unrouted(s) for s in signals]
    return topics


def _tenant_of(topic: str, headers: dict[str, bytes], prefix: str) -> str:
    if "kotel.tenant" in headers:
        return headers["kotel.tenant"].decode(errors="replace")
    parts = topic.removeprefix(prefix + ".").split(".")
    return ".".join(parts[1:-1]) if parts[0] == "tenant" else ""


@dataclass
class _Batch:
    records: list[SinkRecord] = field(default_factory=list)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)


class SinkRunner:
    def __init__(self, topology: Topology, deliverer: Deliverer, *, metrics: SinkMetrics | None = None,
                 retry: RetryConfig | None = None, breaker: CircuitBreakerConfig | None = None,
                 group_id: str | None = None, max_batch: int = 200, poll_timeout: float = 0.5) -> None:
        self.topology = topology
        self.deliverer = deliverer
        self.metrics = metrics or SinkMetrics()
        self.name = deliverer.name
        register = getattr(deliverer, "register_metrics", None)
        if register is not None:  # backend-specific counters (dropped points, partial success) on /metrics
            register(self.metrics.registry)
        self.topics = sink_topics(topology, deliverer.name, deliverer.signals)
        self.group_id = group_id or topology.topic_names.sink_group(deliverer.name)
        base = topology.kafka.librdkafka_config()
        self.consumer = Consumer({**base, "group.id": self.group_id, "enable.auto.commit": False,
                                  "auto.offset.reset": "earliest", "enable.partition.eof": False,
                                  # bounded prefetch: a paused or slow sink must not hoard the backlog
                                  "queued.max.messages.kbytes": 32768, "on_commit": self._committed})
        self.dlq = Producer({**base, "enable.idempotence": True, "acks": "all"})
        self.dlq_topic = TopicNames(topology.topics.prefix).deadletter
        retry = retry or RetryConfig(max_elapsed_time="0s")  # a sink never gives up on a retryable record
        self.backoff = Backoff(retry)
        self.breaker = CircuitBreaker(breaker or CircuitBreakerConfig(), on_change=self._breaker_changed)
        self.max_batch, self.poll_timeout = max_batch, poll_timeout
        self.linger = float(getattr(deliverer, "linger", DEFAULT_LINGER_SECONDS))
        self._last_lag = 0.0
        self.handled = HandledOffsets()  # what a failed commit would make the broker send again

    def _breaker_changed(self, state: object) -> None:
        log.info("sink %s: circuit breaker %s", self.name, getattr(state, "value", state))

    async def run(self, stop: asyncio.Event) -> None:
        if not self.topics:
            raise ValueError(f"no tenant is routed to sink {self.name!r} (check gateway.processors.routing)")
        self.consumer.subscribe(self.topics)
        log.info("sink %s consuming %s as group %s", self.name, ", ".join(self.topics), self.group_id)
        # A batch's commit is sent, without waiting for its answer, by the thread that polls next, before it
        # polls: confluent-kafka runs one call of a consumer at a time, so a synchronous commit from another
        # thread waited for the poll under way (until the next record came) and held up the batch after.
        # Commits go out in order on the coordinator's connection; the last one is waited for at the end.
        due: dict[tuple[str, int], int] = {}  # to send with the next poll
        last: dict[tuple[str, int], int] = {}  # the last batch's, committed again synchronously at the end
        try:
            while not stop.is_set():
                batch = await asyncio.to_thread(self._poll, due)
                due = {}
                batch.records, skipped = self.handled.fresh(batch.records)
                if skipped:  # fetched again after a failed commit: delivered by this process already
                    self.metrics.redelivered.labels(self.name).inc(skipped)
                if batch.offsets:
                    if batch.records and not await self._handle(batch, stop):
                        break  # stopped while retrying: nothing of this batch is committed
                    self.handled.handled(batch.offsets)
                    due = last = batch.offsets
                if time.monotonic() - self._last_lag > LAG_INTERVAL_SECONDS:
                    await asyncio.to_thread(self._update_lag)
        finally:
            if last:
                await asyncio.to_thread(self._commit, last, False)
            await asyncio.to_thread(self._close)

    def _poll(self, due: dict[tuple[str, int], int]) -> _Batch:
        if due:
            self._commit(due, True)
        batch = _Batch()
        prefix = self.topology.topics.prefix
        messages = self.consumer.consume(1, self.poll_timeout)
        if messages and self.max_batch > 1:  # then what else comes until the linger's next tick
            now = time.monotonic()
            messages += self.consumer.consume(self.max_batch - 1, next_tick(now, self.linger) - now)
        for msg in messages:
            if msg.error():
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    log.warning("sink %s: consumer error %s", self.name, msg.error())
                continue
            headers = tuple(msg.headers() or ())
            hdict = dict(headers)
            topic = msg.topic()
            signal = hdict.get("kotel.signal", topic.rsplit(".", 1)[-1].encode()).decode()
            batch.records.append(SinkRecord(
                topic, msg.partition(), msg.offset(), msg.key(), msg.value() or b"", headers,
                _tenant_of(topic, hdict, prefix), signal, msg.timestamp()[1],
            ))
            batch.offsets[(topic, msg.partition())] = msg.offset() + 1
        return batch

    async def _handle(self, batch: _Batch, stop: asyncio.Event) -> bool:
        """Deliver until every record is accepted or dead-lettered; False when stopped before that."""
        pending = batch.records
        while pending and not stop.is_set():
            if not self.breaker.allow():
                await self._paused_wait(stop)
                continue
            started = time.perf_counter()
            try:
                results = await self.deliverer.deliver(pending)
            except Exception as exc:  # a deliverer bug or a network error it did not classify: retry
                log.warning("sink %s: delivery failed: %s", self.name, exc)
                results = [Result(Outcome.RETRY, f"error: {type(exc).__name__}")] * len(pending)
            self.metrics.latency.labels(self.name).observe(time.perf_counter() - started)
            retry = []
            for record, result in zip(pending, results, strict=True):
                if result.outcome is Outcome.OK:
                    self.metrics.exported.labels(self.name, record.tenant, record.signal).inc()
                elif result.outcome is Outcome.PERMANENT:
                    await asyncio.to_thread(self._dead_letter, record, result.reason)
                else:
                    self.metrics.retried.labels(self.name, result.reason or "retry").inc()
                    retry.append((record, result))
            if not retry:
                self.breaker.record_success()
                self.backoff.reset()
                return True
            self.breaker.record_failure()
            pending = [r for r, _ in retry]
            hint = max(res.retry_after for _, res in retry)
            delay = max(hint, next(self.backoff, 30.0))
            await self._sleep_polling(delay, stop)
        return not pending

    async def _paused_wait(self, stop: asyncio.Event) -> None:
        assignment = await asyncio.to_thread(self.consumer.assignment)
        await asyncio.to_thread(self.consumer.pause, assignment)
        self.metrics.paused.labels(self.name).set(1)
        try:
            await self._sleep_polling(max(self.breaker.retry_in(), 0.1), stop)
        finally:
            await asyncio.to_thread(self.consumer.resume, assignment)
            self.metrics.paused.labels(self.name).set(0)

    async def _sleep_polling(self, seconds: float, stop: asyncio.Event) -> None:
        """Wait without leaving the group: poll paused partitions (nothing is fetched) to stay alive."""
        deadline = time.monotonic() + seconds
        while not stop.is_set() and time.monotonic() < deadline:
            assignment = await asyncio.to_thread(self.consumer.assignment)
            await asyncio.to_thread(self.consumer.pause, assignment)
            await asyncio.to_thread(self.consumer.consume, 1, min(0.5, max(0.0, deadline - time.monotonic())))
            await asyncio.to_thread(self.consumer.resume, assignment)

    def _dead_letter(self, record: SinkRecord, reason: str) -> None:
        headers = dead_letter_headers(f"{self.name}: {reason}", record.topic, record.partition, record.offset,
                                      record.headers)
        self.dlq.produce(self.dlq_topic, record.value, record.key, headers=headers)
        if self.dlq.flush(30) != 0:
            raise RuntimeError(f"dead-letter topic {self.dlq_topic} did not acknowledge within 30 s")
        self.metrics.dead_lettered.labels(self.name, reason.split(":")[0][:60]).inc()

    def _commit(self, due: dict[tuple[str, int], int], asynchronous: bool) -> None:
        offsets = [TopicPartition(t, p, o) for (t, p), o in due.items()]
        try:
            self.consumer.commit(offsets=offsets, asynchronous=asynchronous)
        except Exception as exc:  # a rebalance took the partition: its new owner redelivers (at-least-once)
            log.warning("sink %s: commit failed (%s); records will be delivered again", self.name, exc)

    def _committed(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """An asynchronous commit's answer (served by a later poll)."""
        failed = [p for p in partitions if p.error is not None]
        if err is not None or failed:
            log.warning("sink %s: commit failed (%s); records will be delivered again", self.name,
                        err or failed[0].error)

    def _update_lag(self) -> None:
        """Lag from the high watermarks the last fetches brought (no request to the broker).

        An uncached lookup is a ListOffsets request on the connection the fetches use, and the broker
        answers one request per connection at a time: each waited behind the long-polling fetch, and
        over ~40 partitions the poll loop stood still for ~1 s every 5 s (the sink's p95 of 800 ms).
        Until a partition's lag is known it is looked at again on every turn of the loop (it costs no
        request), so the gauge appears with the first fetch, not up to an interval later.
        """
        known = False
        for tp in self.consumer.assignment():
            try:
                _, high = self.consumer.get_watermark_offsets(tp, cached=True)
                position = self.consumer.position([tp])[0].offset
            except Exception:
                continue
            if high < 0 or position < 0:
                continue  # nothing fetched or consumed yet in this assignment: unknown, not zero
            self.metrics.lag.labels(self.name, tp.topic, str(tp.partition)).set(max(0, high - position))
            known = True
        if known:
            self._last_lag = time.monotonic()

    def _close(self) -> None:
        try:
            self.consumer.close()
        finally:
            self.dlq.flush(10)
