"""The Faust app of one stream stage, built from a topology, and the ordered-ack rule every stage follows.

Commit order. Faust (at-least-once) commits the offsets of acked events every ``broker_commit_interval``
after ``producer.flush()``. That flush waits for in-flight sends but does not fail when one of them
failed (``Topic._on_published`` only logs), so a send lost after its retries could be committed past.
Stages therefore hand every input event to `OrderedAcks` with the delivery futures of its outputs: the
event is acked, in consumption order, only once all of them succeeded. A send that fails for good ends
the worker before anything later is acked, so the next owner reprocesses from the failed record.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faust
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from faust.transport.drivers.aiokafka import Producer as AiokafkaProducer
from faust.types import EventT, StreamT

from kotel.topology import Topology
from streams.telemetry import CONTENT_TYPE, WorkerMetrics

if TYPE_CHECKING:  # importing it first at runtime would run into kotel.topology's import cycle
    from kotel.kafka.settings import KafkaSettings

log = logging.getLogger("kotel.worker")

# Records of a few MiB must fit in one request; batches above the old 16 KiB default save round trips.
_MAX_REQUEST_BYTES = 16 * 1024 * 1024
_MAX_BATCH_BYTES = 1024 * 1024
# Per partition; a larger record still comes whole (KIP-74). aiokafka fetches a partition again only once
# its buffered records are consumed: at 4 MiB the dedup worker waited for records most of the time
# (loadtest/dedup_bench.py: 40-50k spans/s at half a core; 16 MiB: 72-99k spans/s).
_MAX_FETCH_BYTES = 16 * 1024 * 1024
EX_SOFTWARE = 70
MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024  # per OrderedAcks: record values held until their acks
# Events Faust buffers per stream ahead of the agent (its default, 4096, held ~1 GiB of large records).
_STREAM_BUFFER = 512


class _IdempotentProducer(AiokafkaProducer):
    """Faust enables idempotence only with transactions; without it a retried produce whose first ack was
    lost writes the output twice, after dedup, where nothing removes the copy."""

    def _settings_extra(self) -> Mapping[str, Any]:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


class KotelApp(faust.App):
    """A Faust app that knows its topology, its stage and its metrics (no module-level app anywhere)."""

    topology: Topology
    stage: str
    metrics: WorkerMetrics
    web_port: int

    def _new_producer(self) -> _IdempotentProducer:
        return _IdempotentProducer(self.transport, loop=self.loop, beacon=self.beacon)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now (the OS picks it); another process could take it before we bind."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _credentials(kafka: KafkaSettings) -> faust.types.auth.CredentialsT | None:
    protocol = kafka.security_protocol
    if protocol == "PLAINTEXT":
        return None
    context = None
    if protocol in ("SSL", "SASL_SSL"):
        tls = kafka.tls
        context = ssl.create_default_context(cafile=tls.ca_file if tls else None)
        if tls is not None:
            if tls.cert_file:
                password = tls.key_password.get_secret_value() if tls.key_password else None
                context.load_cert_chain(tls.cert_file, tls.key_file, password)
            if tls.insecure_skip_verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    sasl = kafka.sasl
    return faust.SASLCredentials(
        username=sasl.username if sasl else None,
        password=sasl.password.get_secret_value() if sasl else None,
        mechanism=sasl.mechanism if sasl else "PLAIN",
        ssl_context=context,
    )


def aiokafka_options(kafka: KafkaSettings) -> dict[str, Any]:
    """Connection options for a plain aiokafka client beside Faust's (e.g. to read an output tail)."""
    options = kafka.aiokafka_config()
    credentials = _credentials(kafka)
    context = getattr(credentials, "ssl_context", None) or getattr(credentials, "context", None)
    if context is not None:
        options["ssl_context"] = context
    return options


def create_app(topology: Topology, stage: str, *, data_dir: Path, web_port: int | None = None) -> faust.App:
    """The Faust app of ``stage``: group/app id ``kotel-<prefix>-<stage>``, RocksDB tables under data_dir.

    ``web_port=None`` picks a free port when the app is created; it is logged and written to
    ``<data_dir>/web_port`` so a scraper or a test can find ``/metrics``. Several workers on one host
    therefore never clash, and a fixed port can still be given with ``--web-port``.
    """
    kafka = topology.kafka
    port = web_port if web_port is not None else free_port()
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "web_port").write_text(f"{port}\n", encoding="utf-8")
    defaults = topology.topics.defaults
    app = KotelApp(
        f"kotel-{topology.topics.prefix}-{stage}",
        broker=[f"kafka://{server.strip()}" for server in kafka.bootstrap_servers.split(",")],
        broker_client_id=f"{kafka.client_id}-{stage}",
        broker_credentials=_credentials(kafka),
        store="rocksdb://",
        datadir=str(data_dir),
        autodiscover=False,
        processing_guarantee="at_least_once",
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_linger_ms=2,
        producer_max_batch_size=_MAX_BATCH_BYTES,
        producer_max_request_size=_MAX_REQUEST_BYTES,
        consumer_max_fetch_size=_MAX_FETCH_BYTES,
        stream_wait_empty=True,
        stream_buffer_maxsize=_STREAM_BUFFER,
        topic_allow_declare=True,
        topic_replication_factor=defaults.replication_factor or 1,
        table_standby_replicas=1,
        web_enabled=True,
        web_bind="127.0.0.1",
        web_host="127.0.0.1",
        web_port=port,
        web_stats_enabled=False,
        web_graph_enabled=False,
        web_tables_enabled=False,
        web_router_enabled=False,
        web_metrics_enabled=False,
        worker_redirect_stdouts=False,
        # A stage worker that dies is noticed after this; Faust's 60 s default leaves its partitions idle.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=2.0,
    )
    app.topology = topology
    app.stage = stage
    app.web_port = port
    app.metrics = WorkerMetrics(stage)

    @app.page("/metrics")
    async def metrics(view: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        return view.bytes(app.metrics.exposition(), content_type=CONTENT_TYPE)

    return app


def metrics_of(app: faust.App) -> WorkerMetrics:
    """The worker's metrics (a private set for an app not made by `create_app`, e.g. in a unit test)."""
    found = getattr(app, "metrics", None)
    if not isinstance(found, WorkerMetrics):
        found = WorkerMetrics(str(getattr(app, "stage", "unknown")))
        app.metrics = found  # type: ignore[attr-defined]
    return found


@dataclass(slots=True)
class Pending:
    """Input events waiting for their outputs; ``payload`` is whatever the stage needs afterwards.

    ``event`` is the last (or only) event; ``earlier`` holds a batch's events before it, in order.
    """

    event: EventT
    futures: Sequence[Awaitable[Any]]
    payload: Any = None
    done: bool = field(default=False)
    earlier: tuple[EventT, ...] = ()
    size: int = 0  # bytes of the events' values

    @property
    def events(self) -> int:
        return len(self.earlier) + 1


# May return more futures (e.g. the state's changelog writes) that must succeed before the acks.
OnDelivered = Callable[[list[Pending]], Awaitable["Sequence[Awaitable[Any]] | None"]]


def fatal(message: str, exc: BaseException | None = None) -> None:
    """End the worker at once: nothing after the failed input is acked, so nothing past it is committed."""
    log.critical("%s; the worker stops so that no offset past it is committed", message, exc_info=exc)
    logging.shutdown()
    os._exit(EX_SOFTWARE)


class OrderedAcks:
    """Acks input events in consumption order once their outputs' delivery futures succeeded.

    Outputs are produced without waiting (the producer batches them); this queue waits for the
    acknowledgements, runs ``on_delivered`` on each group of finished entries (a stage writes its state
    there), then acks their events. Futures ``on_delivered`` returns (state written to a changelog) are
    awaited by a second, ordered stage before the acks, so the next group need not wait for them.
    ``max_in_flight`` bounds the events submitted but not yet acked, ``max_bytes`` their values' size:
    each holds its record until acked, and a backlog of large records (a soak's dedup worker reached
    1.6 GiB RSS) must not all sit here.
    """

    def __init__(self, stream: StreamT, on_delivered: OnDelivered | None = None,
                 max_in_flight: int = 256, max_bytes: int = MAX_IN_FLIGHT_BYTES) -> None:
        self._stream = stream
        self._on_delivered = on_delivered
        self._max = max_in_flight
        self._max_bytes = max_bytes
        self._bytes = 0
        self._queue: deque[Pending] = deque()
        self._acking: deque[tuple[list[Pending], asyncio.Future[Any] | None]] = deque()
        self._count = 0  # events submitted, not yet acked
        self._wake = asyncio.Event()
        self._acking_wake = asyncio.Event()
        self._space = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._ack_task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return self._count

    async def submit(self, event: EventT, futures: Sequence[Awaitable[Any]], payload: Any = None) -> None:
        await self.submit_many([event], futures, payload)

    async def submit_many(self, events: Sequence[EventT], futures: Sequence[Awaitable[Any]],
                          payload: Any = None) -> None:
        """One entry for a batch of events (in consumption order): acked together once ``futures`` and
        the state written for ``payload`` succeeded; ``on_delivered`` sees it as one `Pending`."""
        if not events:
            raise ValueError("submit_many needs at least one event")
        size = sum(_value_size(event) for event in events)
        while self._count >= self._max or (self._bytes and self._bytes + size > self._max_bytes):
            self._space.clear()
            await self._space.wait()
        self._queue.append(Pending(events[-1], futures, payload, earlier=tuple(events[:-1]), size=size))
        self._count += len(events)
        self._bytes += size
        self._idle.clear()
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    async def drained(self) -> None:
        """Wait until every submitted event has been acked."""
        await self._idle.wait()

    async def _run(self) -> None:
        try:
            while True:
                if not self._queue:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                await asyncio.gather(*self._queue[0].futures)
                group = []
                while self._queue and all(_succeeded(f) for f in self._queue[0].futures):
                    group.append(self._queue.popleft())
                more = await self._on_delivered(group) if self._on_delivered is not None else None
                self._acking.append((group, asyncio.gather(*more) if more else None))
                self._acking_wake.set()
                if self._ack_task is None or self._ack_task.done():
                    self._ack_task = asyncio.ensure_future(self._ack_run())
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            fatal("an input record could not be finished (outputs or state not acknowledged)", exc)

    async def _ack_run(self) -> None:
        try:
            while True:
                if not self._acking:
                    self._acking_wake.clear()
                    await self._acking_wake.wait()
                    continue
                group, state = self._acking[0]
                if state is not None:
                    await state
                self._acking.popleft()
                for pending in group:
                    pending.done = True
                    for event in (*pending.earlier, pending.event):
                        await self._stream.ack(event)
                    self._count -= pending.events
                    self._bytes -= pending.size
                self._space.set()
                if not self._count:
                    self._idle.set()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            fatal("an input record could not be finished (outputs or state not acknowledged)", exc)


@dataclass(slots=True)
class _Track:
    generation: int
    expected: int | None  # the next offset this partition must deliver; None: take what comes
    rewound_at: float = 0.0  # monotonic time of our last seek back, 0 when not rewinding


class OffsetGuard:
    """Makes sure a stage sees every record of its partitions, in order, from the committed offset on.

    Faust 0.15 can lose records between its fetcher and its streams right after a rebalance (seen in the
    kill -9 test, about one run in ten): records fetched for a newly assigned partition are dropped when
    the consumer generation changes under them (``Consumer.getmany``), so the stream gets a hole (offsets
    0, 21, 22, ... with 1-20 never delivered) or, when nothing was committed yet, nothing at all. Those
    records are neither processed nor acked, so the partition's commit stops for good. The guard:

    - compares each record with the offset expected next (the committed one for the first record of a
      generation) and, on a hole the log does not have itself (retention, transaction markers), seeks
      Faust back and drops what arrives until the hole is filled;
    - every ``WATCH_SECONDS`` while the agent is idle, seeks back any partition whose high watermark is
      past the offset expected next: records are there but do not come.
    Records seen again are duplicates the stage's own state absorbs.
    """

    REWIND_RETRY_SECONDS = 10.0
    WATCH_SECONDS = 5.0

    def __init__(self, app: faust.App, kafka: KafkaSettings, topics: Sequence[str]) -> None:
        self.app = app
        self.kafka = kafka
        self.topics = frozenset(topics)
        self.rewinds = 0
        self._tracks: dict[Any, _Track] = {}
        self._last_event = 0.0
        self._suspects: dict[Any, int] = {}
        self._busy: dict[str, Callable[[], bool]] = {}
        app.timer(self.WATCH_SECONDS, name=f"offset-guard-{'-'.join(sorted(topics))}")(self._watch)

    async def _watch(self) -> None:
        idle = time.monotonic() - self._last_event >= self.WATCH_SECONDS
        if not idle or self.app.rebalancing or any(busy() for busy in self._busy.values()):
            # Getting records, assigning, or still working on admitted ones: a slow stage on a loaded
            # machine stops admitting because it is busy, not because records went missing.
            self._suspects.clear()
            return
        consumer, generation = self.app.consumer, self.app.consumer_generation_id
        suspects = {}
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp) if tp.topic in self.topics else None
            if highwater is None:
                continue
            track = self._tracks.get(tp)
            expected = track.expected if track is not None and track.generation == generation else None
            if expected is None:
                try:
                    expected = await self._committed(tp)
                except Exception as exc:  # broker out of reach: nothing to compare with; look again later
                    log.info("offset guard: %s[%d] committed offset unknown: %s", tp.topic, tp.partition, exc)
                    return
            start = expected or 0
            if start >= highwater:
                continue
            if self._suspects.get(tp) != start:
                suspects[tp] = start  # waiting records: act if they still have not come next time
                continue
            log.warning("%s[%d]: records up to %d are waiting but none arrive; reading again from %d",
                        tp.topic, tp.partition, highwater - 1, start)
            self.rewinds += 1
            await seek(self.app, tp, start)
        self._suspects = suspects

    def hold_while(self, name: str, busy: Callable[[], bool]) -> None:
        """Never rewind while ``busy()`` (acks in flight); an agent restarted by Faust replaces its own."""
        self._busy[name] = busy

    async def admit(self, event: EventT) -> bool:
        """True: process the record; False: drop it unprocessed and unacked (it will come again)."""
        msg = event.message
        self._last_event = time.monotonic()
        track = self._tracks.get(msg.tp)
        if track is None or track.generation != msg.generation_id:
            track = self._tracks[msg.tp] = _Track(msg.generation_id, await self._committed(msg.tp))
        expected = track.expected
        if expected is None or msg.offset == expected:
            track.expected, track.rewound_at = msg.offset + 1, 0.0
            return True
        if msg.offset < expected:
            return False  # handled already in this generation: a copy fetched again after our seek
        if track.rewound_at and time.monotonic() - track.rewound_at < self.REWIND_RETRY_SECONDS:
            return False  # fetched before our seek; the records from `expected` on are on their way
        first = await self._first_offset(msg.tp, expected)
        if first is None or first >= msg.offset:
            track.expected, track.rewound_at = msg.offset + 1, 0.0  # a hole in the log itself
            return True
        log.warning("%s[%d]: got offset %d but %d was never delivered; reading again from %d",
                    msg.topic, msg.partition, msg.offset, expected, expected)
        self.rewinds += 1
        track.rewound_at = time.monotonic()
        await seek(self.app, msg.tp, expected)
        return False

    async def _committed(self, tp: Any) -> int | None:
        admin = AIOKafkaAdminClient(**aiokafka_options(self.kafka))
        await admin.start()
        try:
            found = await admin.list_consumer_group_offsets(self.app.conf.id, partitions=[tp])
        finally:
            await admin.close()
        meta = found.get(tp)
        return meta.offset if meta is not None and meta.offset >= 0 else None

    async def _first_offset(self, tp: Any, offset: int) -> int | None:
        """The offset of the first record the broker has at or after ``offset`` (None: none yet)."""
        consumer = AIOKafkaConsumer(**aiokafka_options(self.kafka), group_id=None, enable_auto_commit=False)
        await consumer.start()
        try:
            consumer.assign([tp])
            consumer.seek(tp, offset)
            records = (await consumer.getmany(tp, timeout_ms=5000, max_records=1)).get(tp, [])
            return records[0].offset if records else None
        finally:
            await consumer.stop()


def _value_size(event: EventT) -> int:
    message = getattr(event, "message", None)  # a unit test may hand in stand-ins without one
    return len(getattr(message, "value", None) or b"")


async def seek(app: faust.App, tp: Any, offset: int) -> None:
    """Seek Faust's consumer from its own thread.

    Faust's ``Consumer.seek`` calls aiokafka's ``seek`` from the app's loop while aiokafka runs in the
    consumer thread; a seek landing in the middle of the fetcher's ``fetched_records`` crashed it
    (``KeyError`` in ``del self._records[tp]``, seen under load in the baseline and soak runs).
    """
    consumer = app.consumer
    thread = getattr(consumer, "_thread", None)
    if thread is None or not hasattr(thread, "call_thread"):
        await consumer.seek(tp, offset)
        return
    await thread.call_thread(thread.seek, tp, offset)
    consumer._read_offset[tp] = offset if offset else None  # as Consumer.seek does (livelock detection)


def _succeeded(future: Awaitable[Any]) -> bool:
    """Done without error; a failed future raises here, which `OrderedAcks` turns into `fatal`."""
    if not isinstance(future, asyncio.Future) or not future.done():
        return False
    future.result()
    return True
