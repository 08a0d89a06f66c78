"""A stream stage on librdkafka: the consumer on a thread of its own, the stage's work on the event loop,
outputs through an idempotent producer, input offsets committed once the outputs are acknowledged.

Why not Faust: Faust fetches with aiokafka on a thread of its own and hands every fetch and every record
to the event loop in Python. At 20 records/s per signal a Faust hop added 5.4-5.7 ms (routing) and 7-8 ms
(dedup) at p50, at 14-21 % of a core; on this runtime 1.8-2.5 ms at 4-9 % (loadtest/hop_latency.py), and
draining a backlog routing carries 3.5x the records and dedup 1.8x the spans, 4x in small records
(loadtest/results/stages.md). A stage with state keeps it itself: ``prepare`` runs on the consumer's
thread when partitions are assigned, before any of their records is handed over (dedup's recovery).

Commits follow the rule of streams.app: inputs are handed to `Ledger` in consumption order with the
delivery futures of their outputs, an input is done once they all succeeded and every earlier input is
done, and only done inputs are committed (every ``COMMIT_INTERVAL_S``, on a rebalance and when stopping).
A delivery that fails for good ends the worker (exit 70) before anything after it is committed.

Rebalances are eager (every partition is revoked): inside the revoke callback the consumer thread waits
until the loop has finished the poll it is on and every output is acknowledged, and commits; records
handed over but not begun are dropped (whoever gets their partition reads them again from the commit).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition

from kotel import gc_pauses
from kotel.admin_http import AdminServer
from kotel.topology import Topology
from streams.ledger import Ledger, StageFailed
from streams.telemetry import WorkerMetrics

__all__ = ["MAX_RECORD_BYTES", "Acked", "KafkaStage", "Ledger", "StageFailed", "serve"]

log = logging.getLogger("kotel.worker")

EX_SOFTWARE = 70
COMMIT_INTERVAL_S = 1.0
MAX_POLL_RECORDS = 500
MAX_HANDOFF_BATCHES = 8  # polls waiting for the loop; beyond that the consumer thread waits
MAX_HANDOFF_BYTES = 32 * 1024 * 1024  # or beyond this many bytes of record values (one poll always goes)
MAX_QUEUED_OUTPUT_KBYTES = 64 * 1024  # librdkafka's producer queue (default 1 GiB): produce waits beyond
REVOKE_TIMEOUT_S = 60.0
HIGHWATER_INTERVAL_S = 1.0
MAX_RECORD_BYTES = 16 * 1024 * 1024  # records of a few MiB fit one request; the Faust stages' too

Handler = Callable[[Message], Awaitable[tuple[Sequence[asyncio.Future[Any]], Any]]]
# A poll at once (stages that batch per partition): per input, in order, its futures and payload.
BatchHandler = Callable[[list[Message]], Awaitable[list[tuple[Message, Sequence[asyncio.Future[Any]], Any]]]]
# Called on the consumer's thread with the partitions assigned, before any of their records is handed over.
Prepare = Callable[[list[TopicPartition]], None]


class Acked(NamedTuple):
    """Where an output landed; not the delivered message, whose value would stay in memory meanwhile."""

    topic: str
    partition: int
    offset: int


class _Handoff:
    """Polls handed to the loop and not begun: the consumer thread waits while there are too many or they
    hold too many bytes (a backlog of large records would otherwise pile up in memory)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._polls = self._bytes = 0

    def reserve(self, size: int, stop: threading.Event) -> bool:
        """False when stopped while waiting."""
        with self._changed:
            while self._polls and (self._polls >= MAX_HANDOFF_BATCHES
                                   or self._bytes + size > MAX_HANDOFF_BYTES):
                if stop.is_set():
                    return False
                self._changed.wait(0.1)
            self._polls += 1
            self._bytes += size
            return True

    def release(self, size: int) -> None:
        with self._changed:
            self._polls -= 1
            self._bytes -= size
            self._changed.notify()


class KafkaStage:
    """Runs ``handle`` on every record of ``topics`` (or ``handle_batch`` on every poll); ``produce`` is how
    it writes its outputs; ``prepare`` readies a stage's state for partitions being assigned."""

    def __init__(self, topology: Topology, stage: str, topics: Sequence[str], handle: Handler | None,
                 on_done: Callable[[Any], None], *, max_in_flight: int = 1024,
                 handle_batch: BatchHandler | None = None, prepare: Prepare | None = None) -> None:
        base = topology.kafka.librdkafka_config()
        self.group = topology.topic_names.stage_group(stage)
        self.topics = list(topics)
        self.consumer = Consumer({**base, "group.id": self.group, "enable.auto.commit": False,
                                  "auto.offset.reset": "earliest", "enable.partition.eof": False,
                                  # a dead worker's partitions move on after 10 s, as the Faust stages'
                                  "session.timeout.ms": 10000, "heartbeat.interval.ms": 2000,
                                  "queued.max.messages.kbytes": 32768})
        # murmur2 as Java clients (and aiokafka, which routed before) place keys; acks=all, idempotent.
        self.producer = Producer({**base, "enable.idempotence": True, "acks": "all", "linger.ms": 0,
                                  "partitioner": "murmur2_random", "message.max.bytes": MAX_RECORD_BYTES,
                                  "queue.buffering.max.kbytes": MAX_QUEUED_OUTPUT_KBYTES})
        self.ledger = Ledger(on_done, max_in_flight)
        self._handle, self._handle_batch, self._prepare = handle, handle_batch, prepare
        self._committed: dict[tuple[str, int], int] = {}
        self._generation = 0  # bumped on every revoke: polls handed over before it are dropped
        self._idle = asyncio.Event()
        self._idle.set()
        self._stop, self._deliveries_stop = threading.Event(), threading.Event()
        self._reader_failed: asyncio.Future[None] | None = None
        self._handoff = _Handoff()
        self._due: dict[tuple[str, int], int] = {}  # for the consumer thread to commit
        self._due_lock = threading.Lock()
        self._polls: asyncio.Queue[tuple[int, list[Message], int]] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ready = False
        # Kept here: confluent-kafka serialises a consumer's calls, so one from the loop waited for a poll.
        self.assigned: set[tuple[str, int]] = set()
        self.highwater: dict[tuple[str, int], int] = {}  # as of the last fetch, refreshed every second
        self._highwater_at = 0.0
        self._closing = False

    async def produce(self, topic: str, key: bytes | None, value: bytes,
                      headers: Sequence[tuple[str, bytes]] | None = None, *, partition: int = -1,
                      timestamp: int = 0) -> asyncio.Future[Any]:
        """Queue an output (partition -1: by key; timestamp 0: now); the future is its acknowledgement
        (`Acked`) or the error."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def delivered(err: Any, msg: Message) -> None:  # on the delivery thread
            acked = None if err is not None else Acked(msg.topic(), msg.partition(), msg.offset())
            loop.call_soon_threadsafe(_settle, future, err, acked)

        while True:
            try:
                self.producer.produce(topic, value, key=key, headers=list(headers or ()),
                                      partition=partition, timestamp=timestamp, on_delivery=delivered)
                return future
            except BufferError:  # librdkafka's queue is full: the delivery thread empties it
                await asyncio.sleep(0.005)

    async def run(self) -> int:
        """Until SIGTERM / SIGINT (0) or a failure: an output not acknowledged, the handler or the
        consumer failing (70)."""
        self._loop = loop = asyncio.get_running_loop()
        gc_pauses.settle()  # the start-up heap; again once partitions are assigned
        stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        self._reader_failed = loop.create_future()
        self.consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
        reader = threading.Thread(target=self._read, name="kafka-stage-reader", daemon=True)
        deliveries = threading.Thread(target=self._serve_deliveries, name="kafka-stage-deliveries",
                                      daemon=True)
        reader.start()
        deliveries.start()
        ledger, process = asyncio.ensure_future(self.ledger.run()), asyncio.ensure_future(self._process())
        committing = asyncio.ensure_future(self._commit_every())
        stopped = asyncio.ensure_future(stopping.wait())
        code = 0
        try:
            done, _ = await asyncio.wait([stopped, ledger, process, self._reader_failed],
                                         return_when=asyncio.FIRST_COMPLETED)
            failed = next((t.exception() for t in done if t is not stopped and t.exception()), None)
            if failed is not None:
                log.critical("%s; the worker stops so that no offset past it is committed", failed)
                code = EX_SOFTWARE
        finally:
            self._stop.set()
            await asyncio.to_thread(reader.join)
            self._generation += 1  # the record under way is finished, polls not begun are read again
            if code == 0:
                await self._idle.wait()
            process.cancel()
            if code == 0:
                await self.ledger.drained()
            ledger.cancel()
            committing.cancel()
            stopped.cancel()
            self._commit()  # the consumer thread has ended: this one commits
            with self._due_lock:
                due, self._due = self._due, {}
            if due:
                await asyncio.to_thread(self._commit_now, due)
            self._closing = True
            self._deliveries_stop.set()
            await asyncio.to_thread(deliveries.join)
            await asyncio.to_thread(self.producer.flush, 30)
            await asyncio.to_thread(self.consumer.close)
        return code

    def _read(self) -> None:
        """The consumer's thread: polls, and commits between polls (a synchronous commit from another
        thread waited for as long as a poll was under way)."""
        assert self._loop is not None
        try:
            while not self._stop.is_set():
                with self._due_lock:
                    due, self._due = self._due, {}
                if due:
                    self._commit_now(due)
                if time.monotonic() - self._highwater_at > HIGHWATER_INTERVAL_S:
                    self._refresh_highwater()
                messages = self.consumer.consume(1, 0.1)
                if not messages:
                    continue
                messages += self.consumer.consume(MAX_POLL_RECORDS - 1, 0)  # what came along, no waiting
                size = sum(len(m.value() or b"") for m in messages)
                if not self._handoff.reserve(size, self._stop):
                    return
                self._loop.call_soon_threadsafe(self._polls.put_nowait, (self._generation, messages, size))
        except BaseException as exc:  # a rebalance callback or the client failed: end the worker
            self._loop.call_soon_threadsafe(_fail, self._reader_failed, exc)

    def _refresh_highwater(self) -> None:
        self._highwater_at = time.monotonic()
        for topic, partition in list(self.assigned):
            _, high = self.consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
            if high is not None and high >= 0:
                self.highwater[(topic, partition)] = int(high)

    def _serve_deliveries(self) -> None:
        while not self._deliveries_stop.is_set():
            self.producer.poll(0.05)

    async def _process(self) -> None:
        while True:
            generation, messages, size = await self._polls.get()
            self._handoff.release(size)
            self._idle.clear()
            try:
                if self._handle_batch is not None:
                    await self._process_poll(generation, messages, self._handle_batch)
                    continue
                assert self._handle is not None
                for message in self._readable(messages):
                    if generation != self._generation:
                        break  # revoked meanwhile
                    futures, payload = await self._handle(message)
                    await self.ledger.add(message.topic(), message.partition(), message.offset(), futures,
                                          payload, len(message.value() or b""))
            finally:
                self._idle.set()

    async def _process_poll(self, generation: int, messages: list[Message], handle: BatchHandler) -> None:
        if generation != self._generation:
            return  # revoked meanwhile
        for message, futures, payload in await handle(self._readable(messages)):
            await self.ledger.add(message.topic(), message.partition(), message.offset(), futures, payload,
                                  len(message.value() or b""))

    def _readable(self, messages: list[Message]) -> list[Message]:
        """The poll's records; the errors it carried are logged (librdkafka retries on its own)."""
        for message in messages:
            if message.error() is not None:
                log.warning("%s: consumer error %s", self.group, message.error())
        return [message for message in messages if message.error() is None]

    async def _commit_every(self) -> None:
        while True:
            await asyncio.sleep(COMMIT_INTERVAL_S)
            self._commit()

    def _commit(self) -> None:
        """Done inputs not committed yet, for the consumer thread."""
        due = {tp: offset for tp, offset in self.ledger.done.items() if self._committed.get(tp) != offset}
        with self._due_lock:
            self._due.update(due)

    def _commit_now(self, due: dict[tuple[str, int], int]) -> None:
        try:
            self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in due.items()],
                                 asynchronous=False)
        except KafkaException as exc:  # e.g. a rebalance under way: the next commit tries again
            log.warning("%s: commit failed, tried again: %s", self.group, exc)
            return
        self._committed.update(due)

    async def _settle(self) -> dict[tuple[str, int], int]:
        """On the loop, for a revoke: the record under way finished, every output acknowledged."""
        await self._idle.wait()
        await self.ledger.drained()
        return {tp: offset for tp, offset in self.ledger.done.items() if self._committed.get(tp) != offset}

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._generation += 1
        assert self._loop is not None
        if self._closing:  # leaving the group after the last commit
            return
        try:
            due = asyncio.run_coroutine_threadsafe(self._settle(), self._loop).result(REVOKE_TIMEOUT_S)
        except Exception as exc:  # the loop failed or is stopping: what was committed stands
            log.warning("%s: partitions revoked before their outputs settled: %s", self.group, exc)
        else:
            if due:
                self._commit_now(due)
        self.assigned.difference_update((p.topic, p.partition) for p in partitions)
        self.ledger.done.clear()
        self._committed.clear()
        with self._due_lock:
            self._due.clear()  # committed above, or no longer ours to commit
        log.info("%s: revoked %d partitions", self.group, len(partitions))

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("%s: assigned %s", self.group, ", ".join(f"{p.topic}[{p.partition}]" for p in partitions))
        if self._prepare is not None and partitions:
            self._prepare(partitions)  # an exception ends the worker (70) through the consumer thread
        self.assigned.update((p.topic, p.partition) for p in partitions)
        if not self.ready:
            self.ready = True
            log.info("Worker ready")
            if self._loop is not None:
                self._loop.call_soon_threadsafe(gc_pauses.settle)


def _fail(future: asyncio.Future[Any] | None, exc: BaseException) -> None:
    if future is not None and not future.done():
        future.set_exception(exc)


def _settle(future: asyncio.Future[Any], err: Any, acked: Acked | None) -> None:
    if future.done():
        return
    if err is not None:
        future.set_exception(KafkaException(err))
    else:
        future.set_result(acked)


async def serve(runtime: KafkaStage, metrics: WorkerMetrics, data_dir: Path, web_port: int | None,
                doing: str) -> int:
    """A worker's life: /metrics, /healthz and /readyz on 127.0.0.1 (the port also in DATA_DIR/web_port),
    then ``runtime`` until it stops; the exit code."""

    def ready() -> tuple[bool, str]:
        return runtime.ready, "partitions assigned" if runtime.ready else "joining the group"

    admin = AdminServer(f"127.0.0.1:{web_port or 0}", metrics.registry, ready, before_scrape=metrics.sample)
    await admin.start()
    (data_dir / "web_port").write_text(f"{admin.port}\n", encoding="utf-8")
    log.info("worker %s: %s as group %s, metrics http://127.0.0.1:%d/metrics", metrics.stage, doing,
             runtime.group, admin.port)
    try:
        return await runtime.run()
    finally:
        await admin.stop()
