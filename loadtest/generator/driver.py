"""Offer load on a schedule (open loop) or as fast as answered (max rate), and record what happened.

Open loop: each request of a signal is due at its time in `Driver.schedule` whatever happened to earlier
ones, and its latency counts from that due time, so a stalled pipeline shows up as latency instead of
hiding behind a sender that slowed down. When ``max_in_flight`` requests are unanswered the sender
waits for a slot (the next request is late, and its latency says so); ``behind_s`` is how far the
generator itself trails its schedule, reported so that a saturated generator is never mistaken for a
slow pipeline.

Arrivals (``arrivals``): ``even`` spaces each signal's requests evenly and offsets the signals from each
other by a share of the interval, as independent clients are; ``aligned`` sends every signal's request
at the same instant (three clients in lockstep, the worst case for stages that serve the signals in one
event loop); ``poisson`` draws exponential gaps of the same mean (many independent clients).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from kotel.otlp import Signal
from loadtest.generator.ledger import Ledger
from loadtest.generator.shapes import Built, Shapes
from loadtest.generator.targets import Target


@dataclass
class SignalStats:
    offered: int = 0
    acked: int = 0
    refused: int = 0
    requests: int = 0
    in_flight: int = 0
    behind_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)


@dataclass
class DriveStats:
    started: float = 0.0
    signals: dict[str, SignalStats] = field(default_factory=lambda: {s.value: SignalStats() for s in Signal})

    def elapsed(self) -> float:
        return time.monotonic() - self.started if self.started else 0.0


Arrivals = Literal["even", "aligned", "poisson"]


class Driver:
    def __init__(self, shapes: Shapes, target: Target, ledger: Ledger, *, items_per_request: int,
                 max_in_flight: int, arrivals: Arrivals = "even", seed: int = 42) -> None:
        self.shapes, self.target, self.ledger = shapes, target, ledger
        self.items_per_request, self.max_in_flight = items_per_request, max_in_flight
        self.arrivals, self.seed = arrivals, seed
        self.stats = DriveStats()
        self._tasks: set[asyncio.Task[None]] = set()

    def _build(self, signal: Signal, now_ns: int, n: int, warmup: bool) -> Built | None:
        if signal is Signal.TRACES:
            return self.shapes.traces(now_ns, n, warmup)
        if signal is Signal.METRICS:
            return self.shapes.metrics(now_ns, n, warmup)
        return self.shapes.logs(now_ns, n, warmup)

    async def _send(self, built: Built, scheduled_ns: int, slots: asyncio.Semaphore) -> None:
        st = self.stats.signals[built.signal.value]
        led = self.ledger[built.signal.value]
        st.in_flight += 1
        try:
            body = built.request.SerializeToString()
            ok = await self.target.send(built, body)
            now = time.time_ns()
            led.settle(built.request_id, ok, now)
            if ok:
                st.acked += built.items
                st.latencies_ms.append((now - scheduled_ns) / 1e6)
                if built.copies > 1:  # a client that never heard the answer sends the same data again
                    await self.target.send(built, body)
            else:
                st.refused += built.items
        finally:
            st.in_flight -= 1
            slots.release()

    async def _launch(self, built: Built, scheduled_ns: int, slots: asyncio.Semaphore) -> None:
        st = self.stats.signals[built.signal.value]
        st.offered += built.items
        st.requests += 1
        task = asyncio.create_task(self._send(built, scheduled_ns, slots))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def schedule(self, signal: Signal, rate: float, seconds: float, start_ns: int) -> Iterator[int]:
        """Due times (ns) of ``signal``'s requests, each of `request_size` items, at ``rate`` items/s."""
        n = self.request_size(rate)
        interval_ns = n / rate * 1e9
        end = seconds * 1e9
        order = list(Signal).index(signal)
        if self.arrivals == "poisson":
            rng = random.Random(self.seed * 31 + order)

            def gap() -> float:
                return rng.expovariate(1.0) * interval_ns
            at = gap()  # ns after the start
        else:
            def gap() -> float:
                return interval_ns
            at = interval_ns * order / len(Signal) if self.arrivals == "even" else 0.0
        while at < end:
            yield start_ns + int(at)
            at += gap()

    def request_size(self, rate: float) -> int:
        return max(1, min(self.items_per_request, round(rate)))  # at least one request a second

    async def open_loop(self, signal: Signal, rate: float, seconds: float, warmup: bool = False,
                        stop: Callable[[], bool] = lambda: False) -> None:
        """``rate`` items/s of ``signal`` for ``seconds``; then, for traces, the late spans still held."""
        if rate <= 0:
            return
        n = self.request_size(rate)
        slots = asyncio.Semaphore(self.max_in_flight)
        st = self.stats.signals[signal.value]
        for due in self.schedule(signal, rate, seconds, time.time_ns()):
            if stop():
                break
            wait = (due - time.time_ns()) / 1e9
            if wait > 0:
                await asyncio.sleep(wait)
            await slots.acquire()
            st.behind_s = max(0.0, (time.time_ns() - due) / 1e9)
            built = self._build(signal, due, n, warmup)
            if built is not None:
                await self._launch(built, due, slots)
            else:
                slots.release()
        if signal is Signal.TRACES:
            await self.flush_late(slots, stop)

    async def max_rate(self, signal: Signal, seconds: float,
                       stop: Callable[[], bool] = lambda: False) -> None:
        """Closed loop: ``max_in_flight`` requests outstanding at all times; latency from the send."""
        slots = asyncio.Semaphore(self.max_in_flight)
        end = time.monotonic() + seconds
        while time.monotonic() < end and not stop():
            await slots.acquire()
            now = time.time_ns()
            built = self._build(signal, now, self.items_per_request, False)
            if built is not None:
                await self._launch(built, now, slots)
            else:
                slots.release()
        if signal is Signal.TRACES:
            await self.flush_late(slots, stop)

    async def flush_late(self, slots: asyncio.Semaphore, stop: Callable[[], bool] = lambda: False) -> None:
        """Send the late spans still held back, each when it falls due."""
        while self.shapes.late_pending() and not stop():
            due = self.shapes.next_late_ns() or time.time_ns()
            wait = (due - time.time_ns()) / 1e9
            if wait > 0:
                await asyncio.sleep(min(wait, 0.5))
                continue
            await slots.acquire()
            built = self.shapes.traces(time.time_ns(), 0)
            if built is None:
                slots.release()
                continue
            await self._launch(built, due, slots)

    async def run(self, rates: dict[str, float], seconds: float, mode: str = "open", warmup: bool = False,
                  stop: Callable[[], bool] = lambda: False) -> DriveStats:
        """Every signal with a rate above 0 at once; returns when all requests are answered."""
        self.stats.started = self.stats.started or time.monotonic()
        jobs = []
        for signal in Signal:
            rate = rates.get(signal.value, 0.0)
            if rate <= 0:
                continue
            if mode == "max":
                jobs.append(self.max_rate(signal, seconds, stop))
            else:
                jobs.append(self.open_loop(signal, rate, seconds, warmup, stop))
        await asyncio.gather(*jobs)
        await self.drain()
        return self.stats

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
