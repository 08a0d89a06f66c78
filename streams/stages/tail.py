"""The tail-sampling stage: ``<prefix>.deduped.traces`` -> by trace id -> ``<prefix>.sampled.traces``.

Two agents and a decider share one worker. *regroup* reads the deduped topic (keyed by instance) and
writes one bundle per destination partition of ``<app id>-traces-repartition`` (tail_core.regroup).
*buffer* reads that topic; each bundle is planned into the partition's `TraceState` (RocksDB), late
spans follow their cached decision at once, and the bundle is logged to the table's changelog
(heartbeats, below, only move the partition's clock). The *decider* task scans each active partition's
deadline index every ``TICK`` seconds and decides due traces in slices of about ``SLICE_SECONDS`` of
work, yielding to the event loop between slices, so a million pending traces never stall it. Inputs are
acked (OrderedAcks) only once their outputs and their log record are acknowledged.

Deadlines run on event time, not on the wall clock: a trace is stamped with its first span's record time
and decided once the partition's decision clock passes stamp + decision_wait. That clock is a low
watermark moved only by evidence (streams.stages.tail_clock): each bundle, and each heartbeat a regrouper
sends every second to the partitions it wrote nothing to (tail_heartbeat), carries the regrouper's
watermark, the slowest clock of the source partitions it holds; a partition decides on the lowest
watermark of its live regroupers. So a lagging source partition holds decisions back until its spans of
the same time are in, a backlog is decided as its spans were produced, and a broker outage stops the
clocks rather than deciding traces whose spans wait in the agents' spills.

Exactly once in effect, without transactions. A per-partition lock orders state changes. A record is
logged only once the outputs it implies are acknowledged, and it carries the last output offset it
covers; every record says which spans were emitted, so a replica rebuilt from the log never emits them
again; a bundle logged and then re-delivered is skipped by its offset; and outputs that reached the
sampled topic but not the log (a crash in between) are read back from the covered offset before a new
owner touches the partition (`_prime`), as dedup does. Spans re-sent by the regroup agent after a
crash are dropped at decision time (repeats within a trace) or by the emitted set (late copies).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable
from typing import Any

import faust
from aiokafka import TopicPartition
from confluent_kafka.admin import AdminClient
from faust.types import EventT, StreamT

from kotel.kafka.admin import ensure_topic
from kotel.otlp import OtlpDecodeError, Signal, decode_protobuf, validate_request
from kotel.topology import Topology
from streams.app import OrderedAcks, fatal, metrics_of
from streams.deadletter import DeadLetter
from streams.offset_guard import OffsetGuard
from streams.stages.tail_clock import DecisionClock, is_heartbeat
from streams.stages.tail_core import (
    INDEX_HEADER,
    NO_COVER,
    Cover,
    encode_bundle,
    encode_clock,
    encode_decisions,
    fragments,
    output_headers,
    regroup,
    trace_partition,
)
from streams.stages.tail_heartbeat import Watermarker, watermark_of
from streams.stages.tail_metrics import TailMetrics
from streams.stages.tail_policies import TailSampler
from streams.stages.tail_state import Limits, Output, Plan
from streams.stages.tail_store import TraceTable, changelog_retention, read_outputs, topic_partitions
from streams.stages.tail_upstream import UpstreamWatch

log = logging.getLogger("kotel.tail")

TICK = 0.1  # seconds between decision rounds
SLICE_SECONDS = 0.02  # synchronous decision work between two yields to the event loop
MAX_IN_FLIGHT = 256
# Record bytes held per agent until acked. Each is held again downstream (a regrouped bundle in the
# producer, then in the changelog record), so the default 64 MiB per agent let a backlog peak past
# 512 MiB RSS once regrouping got fast (loadtest/results/tail.md); 1 s of input at 50k spans/s fits.
MAX_IN_FLIGHT_BYTES = 16 * 1024 * 1024
MAX_SLICES_IN_FLIGHT = 4  # decided slices per partition waiting for their outputs
CLOCK_LOG_MS = 1000  # the decision clock is logged (W record) this much behind, so jitter needs no record
REGROUPER_EXPIRY_MS = 15_000  # at least: a regrouper unheard this long (a crash) stops holding decisions back


def _now_ms() -> int:
    return int(time.time() * 1000)


class TailStage:
    """The worker's tail sampling: its table, its two agents, its decider."""

    def __init__(self, app: faust.App, topology: Topology) -> None:
        config = topology.gateway.tail_sampling if topology.gateway is not None else None
        if config is None:
            raise ValueError("the topology has no tail_sampling processor under gateway.processors; "
                             "`kotel worker tail` has nothing to do")
        self.app, self.topology = app, topology
        names, topics = topology.topic_names, topology.topics
        self.source = names.deduped("traces")
        self.partitions = topics.resolve(self.source, topics.deduped, "traces").partitions
        self.regrouped = f"{app.conf.id}-traces-repartition"
        self.target = names.sampled_traces
        self.limits = Limits.of(config, self.partitions)
        self.sampler = TailSampler(config)
        self.metrics = metrics_of(app)
        self.tail = TailMetrics(self.metrics.registry)
        self.deadletter = DeadLetter.for_app(app, topology)
        self.table = TraceTable(app, name="traces", limits=self.limits, partitions=self.partitions,
                                key_type=bytes, value_type=bytes, beacon=app.tables.beacon,
                                help="pending traces and decisions")
        self._locks: dict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._primed: dict[int, int] = {}
        self._covers: dict[int, Cover] = {}
        raw = names.raw("traces")
        self.upstream = UpstreamWatch(topology.kafka, names.stage_group("dedup"), raw,
                                      topics.resolve(raw, topics.raw, "traces").partitions, self.partitions)
        self.marks = Watermarker(app, self.regrouped, self.partitions, lambda: self.upstream.busy)
        self._clocks: dict[int, DecisionClock] = {}
        wait = self.limits.decision_wait_ms + self.limits.root_wait_ms
        self._expiry_ms = max(REGROUPER_EXPIRY_MS, 2 * wait)
        self._deciding: dict[int, int] = defaultdict(int)  # decided slices whose record is not logged yet
        self._finishing: dict[int, asyncio.Future[None]] = {}  # the last of them
        self._out_partitions = 0
        self._slice = 256

    def bind(self) -> None:
        app = self.app
        # Faust would create the repartition topic only when its agent starts, after the group's first
        # assignment, which then leaves it out: nothing would ever be buffered. Create it first.
        topics = self.topology.topics
        ensure_topic(AdminClient(self.topology.kafka.librdkafka_config()),
                     topics.resolve(self.regrouped, topics.deduped, "traces"))
        app.tables.add(self.table)
        source = app.topic(self.source, key_type=bytes, value_type=bytes)
        regrouped = app.topic(self.regrouped, key_type=bytes, value_type=bytes, partitions=self.partitions,
                              internal=True)
        app.agent(source, name="tail-regroup")(self._regroup_agent)
        app.agent(regrouped, name="tail-buffer")(self._buffer_agent)
        app.task(self._decider)
        app.task(self.marks.run)
        app.task(self.upstream.run)
        app.on_partitions_assigned.connect(self._assigned)
        # One guard per topic: the heartbeats on one must not keep the guard from watching the other idle
        self.guards = {t: OffsetGuard(app, self.topology.kafka, [t]) for t in (self.source, self.regrouped)}
        self.metrics.add_sampler(self._sample)

    # --- regroup: instance-keyed records -> one bundle per trace partition ------------------------

    async def _assigned(self, _app: Any, assigned: set[TopicPartition], **_: Any) -> None:
        self.marks.keep(tp for tp in assigned if tp.topic == self.source)

    async def _regroup_agent(self, stream: StreamT) -> None:
        manual = stream.noack()
        acks = OrderedAcks(manual, None, MAX_IN_FLIGHT, MAX_IN_FLIGHT_BYTES)
        guard = self.guards[self.source]
        guard.hold_while("regroup", lambda: len(acks) > 0)
        async for event in manual.events():
            if await guard.admit(event):
                msg = event.message
                stamp = int(msg.timestamp * 1000) if msg.timestamp else _now_ms()
                self.marks.admitted(msg.tp, stamp, msg.offset)  # first: its bundles' time is not past
                await self._regroup(event, acks)

    async def _regroup(self, event: EventT, acks: OrderedAcks) -> None:
        msg = event.message
        labels = self.metrics.stage, "traces"
        self.metrics.records_in.labels(*labels).inc()
        headers = list(msg.headers or ())
        try:
            request = decode_protobuf(Signal.TRACES, msg.value or b"")
            parts, spans = regroup(request, self.partitions, msg.value)
        except OtlpDecodeError as exc:
            reason = str(exc)
            if "trace id" in reason:  # name the offending span as every stage does
                problems = validate_request(Signal.TRACES, request, max_problems=3)
                reason = f"invalid OTLP span: {'; '.join(problems)}" if problems else reason
            future = await self.deadletter.submit(msg.value or b"", msg.key, reason, msg.topic,
                                                  msg.partition, msg.offset, headers, kind="invalid_otlp")
            await acks.submit(event, [future])
            return
        self.metrics.items_in.labels(*labels).inc(spans)
        producer = await self.app.maybe_start_producer()
        headers = self.marks.headers(headers)
        futures = [await producer.send(self.regrouped, msg.key, value, partition=p, timestamp=msg.timestamp,
                                       headers=[*headers, (INDEX_HEADER, index)])
                   for p, (value, index) in parts.items()]
        self.marks.wrote(parts)
        await acks.submit(event, futures)

    # --- buffer: bundles -> trace state; late spans follow their decision -------------------------

    async def _buffer_agent(self, stream: StreamT) -> None:
        manual = stream.noack()
        acks = OrderedAcks(manual, None, MAX_IN_FLIGHT, MAX_IN_FLIGHT_BYTES)
        guard = self.guards[self.regrouped]
        guard.hold_while("buffer", lambda: len(acks) > 0)
        async for event in manual.events():
            if await guard.admit(event):
                if is_heartbeat(event.message.headers or ()):
                    await self._heartbeat(event, acks)
                else:
                    await self._buffer(event, acks)

    async def _heartbeat(self, event: EventT, acks: OrderedAcks) -> None:
        """A regrouper's watermark-only record: the partition's clock hears it; no state, no log."""
        msg, p = event.message, event.message.partition
        if (mark := watermark_of(msg, self.tail.bad_watermarks)) is not None:
            async with self._locks[p]:
                await self._ensure_primed(p)
                self._clocks[p].heard(*mark, time.monotonic())
        await acks.submit(event, [])

    async def _buffer(self, event: EventT, acks: OrderedAcks) -> None:
        msg, p = event.message, event.message.partition
        headers = list(msg.headers or ())
        value = msg.value or b""
        index = next((v for k, v in headers if k == INDEX_HEADER), None)
        try:
            frags = fragments(value, index)
        except OtlpDecodeError as exc:
            future = await self.deadletter.submit(value, msg.key, str(exc), msg.topic, msg.partition,
                                                  msg.offset, headers, kind="invalid_otlp")
            await acks.submit(event, [future])
            return
        tenant = next((v.decode(errors="replace") for k, v in headers if k == "kotel.tenant"), "")
        mark = watermark_of(msg, self.tail.bad_watermarks)
        async with self._locks[p]:
            await self._ensure_primed(p)
            state = self.table.store.state(p)
            now = _now_ms()
            if msg.timestamp:
                now = min(now, int(msg.timestamp * 1000))
            clock = self._clocks[p]
            if mark is not None:
                clock.heard(*mark, time.monotonic())
            else:
                clock.unmarked(now, time.monotonic())
            plan = state.ingest(msg.offset, now, tenant, frags)
            if plan.skipped:
                logged: Awaitable[Any] | None = None
            else:
                if plan.outputs:
                    last = await self._emit(p, plan.outputs)
                    if not self._deciding[p]:  # else a decided slice's outputs may lie before these
                        self._covers[p] = last
                cover = self._covers.get(p, state.meta.cover)
                state.commit(plan, cover)
                record = encode_bundle(cover, msg.offset, now, tenant, value, index or b"")
                logged = self._log(p, b"B%d" % msg.offset, record)
        self._count(plan)
        await acks.submit(event, [logged] if logged is not None else [])

    # --- decisions ---------------------------------------------------------------------------------

    async def _decider(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            if self.app.rebalancing or getattr(self.app, "in_recovery", False):
                continue
            try:
                for p in self.table.store.active_partitions():
                    await self._decide(p)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                fatal("tail sampling decisions failed", exc)

    async def _decide(self, p: int) -> None:
        """Decide a partition's due traces, slice by slice.

        A slice is decided and written under the partition's lock, without awaiting anything; its
        outputs and its log record follow outside it (`_finish`), so ingestion does not wait for the
        broker. A bundle ingested meanwhile sees the decision (its spans are late), and a replay that
        meets it before the verdict gets the same answer (tail_core.Verdict.fragments).
        """
        generation = self.app.consumer_generation_id
        while True:
            async with self._locks[p]:
                if self.app.consumer_generation_id != generation or self.app.rebalancing:
                    return
                await self._ensure_primed(p)
                state = self.table.store.state(p)
                started, started_cpu = time.perf_counter(), time.thread_time()
                now = self._stream_now(p)
                if not 0 <= now - state.meta.stream_ms < 2 * CLOCK_LOG_MS:  # a takeover starts from it
                    cover, logged = self._covers.get(p, state.meta.cover), now - CLOCK_LOG_MS
                    state.commit(state.clocked(logged), cover)
                    self._log(p, b"W", encode_clock(cover, logged))
                due = state.due(now, self._slice)
                if not due:
                    return
                plan = state.decide([tid for tid, _ in due], self.sampler)
                state.commit(state.settle(plan, plan.verdicts, now))
                spent, spent_cpu = time.perf_counter() - started, time.thread_time() - started_cpu
                self._deciding[p] += 1
                self._finishing[p] = asyncio.ensure_future(self._finish(p, plan, now,
                                                                        self._finishing.get(p)))
            self._adapt(spent, len(due))
            self.tail.slice.observe(spent)
            self.tail.slice_cpu.observe(spent_cpu)
            forced = sum(1 for _, reason in due if reason == "num_traces")
            if forced:
                self.tail.early.labels("num_traces").inc(forced)
            self._count(plan)
            if self._deciding[p] >= MAX_SLICES_IN_FLIGHT:
                await asyncio.shield(self._finishing[p])
            else:
                await asyncio.sleep(0)

    async def _finish(self, p: int, plan: Plan, now: int, previous: asyncio.Future[None] | None) -> None:
        """A decided slice's outputs, then (after the slice before it) its log record."""
        try:
            last = await self._emit(p, plan.outputs) if plan.outputs else None
            if previous is not None:
                await previous
            self._deciding[p] -= 1
            if last is not None:
                out_p, offset = last
                known = self._covers.get(p, NO_COVER)
                self._covers[p] = (out_p, max(offset, known[1] if known[0] == out_p else -1))
            self._log(p, b"D", encode_decisions(self._covers.get(p, NO_COVER), now, plan.verdicts))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            fatal("a decided slice of traces could not be written", exc)

    def _stream_now(self, p: int) -> int:
        """The partition's decision clock: the low watermark of its regroupers (see the module doc)."""
        clock = self._clocks.get(p)
        return clock.now(_now_ms(), time.monotonic()) if clock is not None else _now_ms()

    def _adapt(self, spent: float, size: int) -> None:
        """Size the next slice so that its synchronous work takes about SLICE_SECONDS."""
        if size < self._slice:
            return
        per_trace = spent / max(size, 1)
        target = int(SLICE_SECONDS / per_trace) if per_trace > 0 else self._slice * 2
        self._slice = max(16, min(4096, (self._slice + target) // 2))

    # --- outputs, log, takeover --------------------------------------------------------------------

    async def _emit(self, p: int, outputs: list[Output]) -> tuple[int, int]:
        """Produce and wait for the outputs; the output partition and the offset of the last one."""
        if not self._out_partitions:
            self._out_partitions = await self._check_target()
        out_p = p % self._out_partitions
        producer = await self.app.maybe_start_producer()
        futures = [await producer.send(self.target, o.trace_id.hex().encode(), o.value, partition=out_p,
                                       timestamp=None, headers=output_headers(o.tenant)) for o in outputs]
        try:
            sent = await asyncio.gather(*futures)
        except Exception as exc:
            fatal(f"sampled traces could not be written to {self.target}", exc)
            raise
        labels = self.metrics.stage, "traces"
        self.metrics.records_out.labels(*labels).inc(len(outputs))
        self.metrics.items_out.labels(*labels).inc(sum(o.spans for o in outputs))
        return out_p, max(meta.offset for meta in sent)

    def _log(self, p: int, key: bytes, value: bytes) -> Awaitable[Any]:
        store = self.table.store
        store.mark_dirty(p)
        future = self.table.send_changelog(p, key, value)

        def done(fut: asyncio.Future[Any]) -> None:
            store.acknowledged(p)
            if not fut.cancelled() and fut.exception() is not None:
                fatal("a tail-sampling changelog record was not acknowledged", fut.exception())

        future.add_done_callback(done)
        return future

    async def _ensure_primed(self, p: int) -> None:
        generation = self.app.consumer_generation_id
        if self._primed.get(p) != generation:
            await self._prime(p)
            self._primed[p] = generation

    async def _prime(self, p: int) -> None:
        """Before a partition's first work: note outputs of it that the changelog does not cover, and
        start its decision clock from the one logged."""
        if not self._out_partitions:
            self._out_partitions = await self._check_target()
        state = self.table.store.state(p)
        self._clocks[p] = DecisionClock(self._expiry_ms)
        self._clocks[p].seed(state.meta.stream_ms or _now_ms(), time.monotonic())
        tp = TopicPartition(self.target, p % self._out_partitions)
        floor = _now_ms() - int(changelog_retention(self.limits).total_seconds() * 1000)
        found = await read_outputs(self.topology.kafka, tp, state.meta.cover, floor,
                                   lambda tid: trace_partition(tid, self.partitions) == p)
        self._covers[p] = (tp.partition, found.end - 1) if found.end > 0 else state.meta.cover
        if found.start >= found.end:
            return
        if found.emitted:
            now, cover = _now_ms(), self._covers[p]
            plan = state.prime(found.emitted, now)
            state.commit(plan, cover)
            self._log(p, b"P", encode_decisions(cover, now, plan.verdicts, primed=True))
            self.tail.primed.inc(sum(len(ids) for ids in found.emitted.values()))
        log.info("%s[%d]: %d traces found in %d output records past the changelog", self.regrouped, p,
                 len(found.emitted), found.end - found.start)

    async def _check_target(self) -> int:
        partitions = await topic_partitions(self.topology.kafka, self.target)
        if not partitions:
            fatal(f"{self.target} does not exist (run `kotel topology apply`)")
        return partitions

    # --- counters ----------------------------------------------------------------------------------

    def _count(self, plan: Plan) -> None:
        t = self.tail
        for (sampled, policy), n in plan.decided.items():
            decision = "sampled" if sampled else "dropped"
            t.traces.labels(decision, policy).inc(n)
            t.spans.labels(decision, policy).inc(plan.decided_spans[sampled, policy])
        for late in plan.late:
            decision = "sampled" if late.sampled else "dropped"
            t.late.labels(decision).inc(late.spans)
            t.lateness.labels(decision).observe(late.lateness_ms / 1000)
        for limit, n in plan.truncated.items():
            t.truncated.labels(limit).inc(n)
        for reason, n in plan.early.items():
            t.early.labels(reason).inc(n)

    def _sample(self) -> None:
        store = self.table.store
        active = store.active_partitions()
        self.tail.pending.set(sum(store.state(p).meta.pending for p in active))
        now = _now_ms()
        self.tail.clock_lag.set(max((now - self._stream_now(p) for p in active if p in self._clocks),
                                    default=0) / 1000)


def bind(app: faust.App, topology: Topology) -> None:
    """Entry point of `kotel worker tail`: add the tail-sampling agents and table of ``topology``."""
    TailStage(app, topology).bind()
