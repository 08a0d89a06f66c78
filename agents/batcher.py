"""The batch processor: gathers accepted resource entries and hands them on per Kafka key.

Entries arrive already serialized (kotel.otlp.entries), so a batch is built by joining bytes per
key, never by copying messages. Every submitter waits for its batch to be durable (the delivery
promise), so a batch is flushed at ``send_batch_size`` items, at the next tick of ``timeout`` (as the
Collector's batch processor: kotel.ticks), or once its oldest submitter has waited ``max_ack_delay`` —
whichever comes first. ``send_batch_max_size`` cuts a large backlog into several batches of whole
requests (a single request larger than it goes alone).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from kotel.otlp import Entry, Signal, join
from kotel.ticks import next_tick
from kotel.topology.processors import BatchConfig

# (signal, key, tenant, request bytes) -> durable
Sink = Callable[[Signal, str, str, bytes], Awaitable[None]]


@dataclass
class _Pending:
    requests: list[list[Entry]] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    items: int = 0


class Batcher:
    def __init__(self, signal: Signal, config: BatchConfig, sink: Sink) -> None:
        self.signal = signal
        self._size = config.send_batch_size
        self._max = config.send_batch_max_size
        self._tick = config.timeout.total_seconds()
        self._max_delay = config.max_ack_delay.total_seconds()
        self._sink = sink
        self._pending = _Pending()
        self._timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task[None]] = set()
        self._closed = False

    async def add(self, entries: list[Entry]) -> None:
        """Return once the batch holding these entries is durable; raise what the sink raised."""
        if self._closed:
            raise RuntimeError("batcher is closed")
        items = sum(e.items for e in entries)
        waiter = asyncio.get_running_loop().create_future()
        pending = self._pending
        pending.requests.append(entries)
        pending.counts.append(items)
        pending.waiters.append(waiter)
        pending.items += items
        if self._size and pending.items >= self._size:
            self._flush()
        elif self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(self.flush_at(loop.time()), self._flush)
        await waiter

    def flush_at(self, now: float) -> float:
        """When a batch whose first request came at ``now`` is due: the next tick, or ``max_ack_delay``."""
        return min(next_tick(now, self._tick), now + self._max_delay)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, _Pending()
        if not pending.requests:
            return
        for requests, waiters in self._chunks(pending):
            task = asyncio.get_running_loop().create_task(self._deliver(requests, waiters))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    def _chunks(self, pending: _Pending) -> list[tuple[list[list[Entry]], list[asyncio.Future[None]]]]:
        if not self._max or pending.items <= self._max:
            return [(pending.requests, pending.waiters)]
        chunks, requests, waiters, items = [], [], [], 0
        for request, count, waiter in zip(pending.requests, pending.counts, pending.waiters, strict=True):
            if requests and items + count > self._max:
                chunks.append((requests, waiters))
                requests, waiters, items = [], [], 0
            requests.append(request)
            waiters.append(waiter)
            items += count
        chunks.append((requests, waiters))
        return chunks

    async def _deliver(self, requests: list[list[Entry]], waiters: list[asyncio.Future[None]]) -> None:
        by_key: dict[tuple[str, str], list[bytes]] = {}
        for request in requests:
            for entry in request:
                by_key.setdefault((entry.key, entry.tenant), []).append(entry.framed)
        try:
            await asyncio.gather(*(self._sink(self.signal, key, tenant, join(framed))
                                   for (key, tenant), framed in by_key.items()))
        except Exception as exc:  # every waiter learns the outcome; nothing is retried silently here
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
                    waiter.exception()  # retrieved by the waiter; keeps asyncio from logging it again
            return
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def close(self) -> None:
        """Flush what is pending and wait for every flush under way (used on reload and shutdown)."""
        self._closed = True
        self._flush()
        if self._flushes:
            with contextlib.suppress(Exception):
                await asyncio.gather(*self._flushes, return_exceptions=True)
