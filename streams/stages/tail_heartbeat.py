"""The regroup side's watermark in a worker: its source clock, the broker's fetch facts, heartbeats.

`RegroupClock` (tail_clock) is pure; this binds it to Faust. The fetch facts come from aiokafka's
consumer (``highwater``, ``last_poll_timestamp``), which faust-streaming 0.15 keeps in its consumer
thread, reachable only through a private attribute: `aiokafka_consumer` is the one place that reaches
for it. Without it the partitions' highwater still comes from Faust, but no fetch time does, so no source
clock moves past its last record (a warning says so once): slower decisions, never early ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Any

import faust
from faust.exceptions import NotReady
from prometheus_client import Counter

from streams.stages.tail_clock import (
    HEARTBEAT_MS,
    BadWatermark,
    Headers,
    Poll,
    RegroupClock,
    heartbeat_headers,
    read_watermark,
    watermark_headers,
    without_watermark,
)

log = logging.getLogger("kotel.tail")

_UNREADABLE = (AssertionError, AttributeError, KeyError, NotReady)  # unassigned, rebalancing, not started


def aiokafka_consumer(app: faust.App) -> Any:
    """aiokafka's consumer under Faust's consumer thread. Raises NotReady before it started, and
    AttributeError where another Faust driver or version keeps it elsewhere."""
    return app.consumer._thread._ensure_consumer()


class Watermarker:
    """One worker's regrouper: its id, the low watermark of its source partitions, its heartbeats."""

    def __init__(self, app: faust.App, topic: str, partitions: int,
                 upstream_busy: Callable[[], frozenset[int]] = frozenset) -> None:
        self.app, self.topic, self.partitions = app, topic, partitions
        self.upstream_busy = upstream_busy  # source partitions the stage before us still has input for
        self.regrouper = uuid.uuid4().hex.encode()  # this process's id in the watermark headers
        self.sources = RegroupClock()
        self._wrote: dict[int, float] = {}  # repartition partition -> monotonic s of our last record
        self._round: list[asyncio.Future[Any]] = []  # the last heartbeats, until the broker took them
        self._beating: asyncio.Future[None] | None = None  # a round being handed to the producer
        self._warned = False

    def admitted(self, tp: Hashable, stamp_ms: int, offset: int) -> None:
        self.sources.admitted(tp, stamp_ms, offset, _now_ms())

    def keep(self, assigned: Iterable[Hashable]) -> None:
        self.sources.keep(assigned)

    def watermark(self) -> int:
        return self.sources.watermark(_now_ms(), self._polls())

    def headers(self, given: Headers) -> list[tuple[str, bytes | None]]:
        """A bundle's headers: the input's, with our watermark instead of any it carried."""
        return [*without_watermark(given), *watermark_headers(self.regrouper, self.watermark())]

    def wrote(self, partitions: Iterable[int], mono: float | None = None) -> None:
        at = time.monotonic() if mono is None else mono
        for p in partitions:
            self._wrote[p] = at

    async def run(self) -> None:
        """Every HEARTBEAT_MS: a watermark-only record to each repartition partition we wrote nothing to."""
        while True:
            await asyncio.sleep(HEARTBEAT_MS / 1000)
            self.tick(time.monotonic())

    def tick(self, mono: float) -> None:
        """One round: the source clock looks at the fetch facts every round, so that it notices a broker
        out of reach even while a send waits for it (Faust's full producer buffer waited out an outage)."""
        mark = self.watermark()
        if self._beating is None or self._beating.done():
            self._beating = asyncio.ensure_future(self._beat_logged(mono, mark))

    async def _beat_logged(self, mono: float, mark: int) -> None:
        try:
            await self.beat(mono, mark)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the next round tries again; a missed one only slows decisions
            log.warning("tail-sampling heartbeats failed: %s", exc)

    async def beat(self, mono: float, mark: int | None = None) -> None:
        """Heartbeats carrying ``mark`` (the watermark now, when not given)."""
        mark = self.watermark() if mark is None else mark
        if any(not f.done() for f in self._round):
            return  # the broker has not taken the previous round: do not pile them up
        every = HEARTBEAT_MS / 1000
        due = [p for p in range(self.partitions) if mono - self._wrote.get(p, mono - every) >= every]
        if not due:
            return
        producer = await self.app.maybe_start_producer()
        headers = heartbeat_headers(self.regrouper, mark)
        sent: list[Awaitable[Any]] = [
            await producer.send(self.topic, self.regrouper, b"", partition=p, timestamp=None, headers=headers)
            for p in due]
        self._round = [asyncio.ensure_future(f) for f in sent]
        for future in self._round:
            future.add_done_callback(_quiet)
        self.wrote(due, mono)

    def _polls(self) -> Callable[[Hashable], Poll | None]:
        consumer: Any = None
        try:
            consumer = aiokafka_consumer(self.app)
        except NotReady:
            pass  # no fetch yet
        except AttributeError:
            if not self._warned:
                self._warned = True
                log.warning("aiokafka's consumer is not reachable through Faust: source partitions' "
                            "clocks stay at their last record until the next one (decisions wait longer)")

        busy = self.upstream_busy()

        def poll(tp: Hashable) -> Poll | None:
            behind = getattr(tp, "partition", None) in busy
            try:
                if consumer is None:
                    return Poll(self.app.consumer.highwater(tp), None, behind)
                return Poll(consumer.highwater(tp), consumer.last_poll_timestamp(tp), behind)
            except _UNREADABLE:  # not assigned (any more), or no fetch yet: no evidence
                return None

        return poll


def watermark_of(msg: Any, bad: Counter) -> tuple[bytes, int] | None:
    """A repartition record's (regrouper, watermark); None without one, or when malformed (counted)."""
    try:
        return read_watermark(list(msg.headers or ()))
    except BadWatermark as exc:
        log.debug("%s[%d]@%d: %s", msg.topic, msg.partition, msg.offset, exc)
        bad.inc()
        return None


def _quiet(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.debug("a heartbeat was not delivered: %s", future.exception())


def _now_ms() -> int:
    return int(time.time() * 1000)
