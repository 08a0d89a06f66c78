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
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faust
from faust.transport.drivers.aiokafka import Producer as AiokafkaProducer
from faust.types import EventT, StreamT

from kotel import gc_pauses
from kotel.topology import Topology
from streams.kafka_stage import MAX_RECORD_BYTES
from streams.metadata_pacing import pace_metadata_retries
from streams.telemetry import CONTENT_TYPE, WorkerMetrics

if TYPE_CHECKING:  # importing it first at runtime would run into kotel.topology's import cycle
    from kotel.kafka.settings import KafkaSettings

log = logging.getLogger("kotel.worker")

# Batches above the old 16 KiB default save round trips (records up to MAX_RECORD_BYTES fit a request).
_MAX_BATCH_BYTES = 1024 * 1024
# Per partition; a larger record still comes whole (KIP-74). aiokafka fetches a partition again only once
# its buffered records are consumed: at 4 MiB the dedup worker waited for records most of the time
# (loadtest/dedup_bench.py: 40-50k spans/s at half a core; 16 MiB: 72-99k spans/s).
_MAX_FETCH_BYTES = 16 * 1024 * 1024
EX_SOFTWARE = 70
MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024  # per OrderedAcks: record values held until their acks
# aiokafka keeps one request in flight per broker, so what is sent meanwhile still shares the next request:
# lingering on top only delays an idle stage's output (dedup and routing each ~3 ms less per hop without,
# loadtest/hop_latency.py). The tail stage's output waits for decision_wait anyway, and its many small
# repartition sends went ~5 % faster with 2 ms of linger (loadtest/tail_bench.py).
_LINGER_MS = {"tail": 2}
# Events Faust buffers per stream ahead of the agent (its default, 4096, held ~1 GiB of large records).
_STREAM_BUFFER = 512


class _IdempotentProducer(AiokafkaProducer):
    """Faust enables idempotence only with transactions; without it a retried produce whose first ack was
    lost writes the output twice, after dedup, where nothing removes the copy."""

    def _settings_extra(self) -> Mapping[str, Any]:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


class SettledWorker(faust.Worker):
    """Faust's worker, whose start-up heap is frozen once it is up (see `kotel.gc_pauses`)."""

    async def on_startup_finished(self) -> None:
        await super().on_startup_finished()
        gc_pauses.settle()


class KotelApp(faust.App):
    """A Faust app that knows its topology, its stage and its metrics (no module-level app anywhere)."""

    topology: Topology
    stage: str
    guarded_topics: set[str]
    metrics: WorkerMetrics
    web_port: int

    def _new_producer(self) -> _IdempotentProducer:
        return _IdempotentProducer(self.transport, loop=self.loop, beacon=self.beacon)

    def _new_consumer(self) -> Any:
        """Faust's consumer, except that it marks no offset gaps as acked on topics an `OffsetGuard`
        watches (``guarded_topics``): the guard reads such gaps again, or adds them (``add_log_hole``)
        once it has seen that the log has no records there. See `streams.offset_guard`."""
        consumer = super()._new_consumer()
        add_gap = consumer._add_gap

        async def add_unguarded_gap(tp: Any, offset_from: int, offset_to: int) -> None:
            if tp.topic not in self.guarded_topics:
                await add_gap(tp, offset_from, offset_to)

        consumer._add_gap = add_unguarded_gap
        consumer.add_log_hole = add_gap
        return consumer


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
    pace_metadata_retries()
    kafka = topology.kafka
    port = web_port if web_port is not None else free_port()
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "web_port").write_text(f"{port}\n", encoding="utf-8")
    defaults = topology.topics.defaults
    app = KotelApp(
        topology.topic_names.stage_group(stage),
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
        producer_linger_ms=_LINGER_MS.get(stage, 0),
        producer_max_batch_size=_MAX_BATCH_BYTES,
        producer_max_request_size=MAX_RECORD_BYTES,
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
    app.guarded_topics = set()
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


def _value_size(event: EventT) -> int:
    message = getattr(event, "message", None)  # a unit test may hand in stand-ins without one
    return len(getattr(message, "value", None) or b"")


def _succeeded(future: Awaitable[Any]) -> bool:
    """Done without error; a failed future raises here, which `OrderedAcks` turns into `fatal`."""
    if not isinstance(future, asyncio.Future) or not future.done():
        return False
    future.result()
    return True
