"""Every record of a stage's partitions, in order, from the committed offset on: `OffsetGuard`.

Faust 0.15 marks a jump in the offsets it delivers as acked (``Consumer._add_gap``), meant for the holes
transaction markers leave. A jump it causes itself, by dropping fetched records on a rebalance, is then
committed past as soon as a later record is acked, while the guard is still reading those records
again: a worker killed in between lost them (the dedup kill -9 test, one run in a few). `KotelApp` keeps
Faust from adding gaps on guarded topics; the guard adds only the holes the log itself has.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import faust
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from faust.types import EventT

from streams.app import aiokafka_options

if TYPE_CHECKING:
    from kotel.kafka.settings import KafkaSettings

log = logging.getLogger("kotel.worker")


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
    records are never processed, and Faust would count them as acked (see above). The guard:

    - compares each record with the offset expected next (for the first record of a generation the
      committed one, or the log's first when nothing is committed) and, on a hole the log does not have
      itself (retention, transaction markers), seeks Faust back and drops what arrives until the hole is
      filled;
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
        guarded = getattr(app, "guarded_topics", None)
        if guarded is not None:
            guarded.update(self.topics)  # Faust must not mark their offset gaps as acked (module doc)
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
            start = await self._committed(msg.tp)
            if start is None:  # nothing committed: the stream starts at the log's first record
                start = await self._first_offset(msg.tp, 0)
            track = self._tracks[msg.tp] = _Track(msg.generation_id, start)
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
            # A hole in the log itself (retention, transaction markers): Faust must count it as acked.
            add_hole = getattr(self.app.consumer, "add_log_hole", None)
            if add_hole is not None and msg.offset > expected:
                await add_hole(msg.tp, expected, msg.offset - 1)
            track.expected, track.rewound_at = msg.offset + 1, 0.0
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
        consumer = AIOKafkaConsumer(**aiokafka_options(self.kafka), group_id=None, enable_auto_commit=False,
                                    auto_offset_reset="earliest")  # ``offset`` deleted: the log's start
        await consumer.start()
        try:
            consumer.assign([tp])
            consumer.seek(tp, offset)
            records = (await consumer.getmany(tp, timeout_ms=5000, max_records=1)).get(tp, [])
            return records[0].offset if records else None
        finally:
            await consumer.stop()


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


