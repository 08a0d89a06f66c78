"""Ships the spill back into Kafka once Kafka is healthy again, oldest part first.

The ordering rule, in full: records leave the spill in the order they entered it (parts oldest first,
rows in a part in submit order), and while the spill holds anything, *every* new publish is written to
the spill behind it rather than sent directly. Per-key order therefore holds across an outage: nothing
newer for a key can overtake spilled records of that key. Direct publishing resumes only once the last
part is acknowledged and deleted, so the switch back cannot reorder either. A publish headed for the
spill also waits until the previous publish for its key has been placed (acknowledged or submitted),
so spill order follows call order per key. The one gap: when a direct record fails while a later
record of its key, already handed to librdkafka, still succeeds, the later one lands first.

A part is deleted only after every one of its records was acknowledged; if a part partly fails, only its
unacknowledged records are sent again. A crash between acknowledgement and deletion replays the part
once more (at least once; dedup downstream absorbs it). A restarted agent simply finds the parts on disk.

While the spill is not empty no publish reaches Kafka, so the replayer is the breaker's probe: it waits
out the open period, asks for metadata, and the outcome of shipping a part closes or re-opens the
breaker. Between failures it waits per ``retry_on_failure``; once ``max_elapsed_time`` is spent it keeps
trying at ``max_interval`` (the data is on disk and is never dropped for age) and says so in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from agents.publish.spill import Spill, SpillRecord
from agents.telemetry import AgentMetrics
from kotel.resilience.breaker import CircuitBreaker
from kotel.resilience.retry import Backoff
from kotel.topology.exporters import RetryConfig

log = logging.getLogger(__name__)


class Sender(Protocol):
    async def send(self, records: Sequence[SpillRecord], timeout: float) -> list[SpillRecord]:
        """Produce in order and wait (bounded); the records that were not acknowledged."""
        ...

    async def metadata_ok(self, timeout: float) -> bool:
        """True when a broker answered a metadata request."""
        ...


class Replayer:
    def __init__(
        self,
        spill: Spill,
        sender: Sender,
        breaker: CircuitBreaker,
        retry: RetryConfig,
        *,
        timeout: float,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self._spill = spill
        self._sender = sender
        self._breaker = breaker
        self._retry = retry
        self._timeout = timeout
        self._metrics = metrics
        self._task: asyncio.Task[None] | None = None
        self._healthy = False  # a metadata request succeeded since the last failure
        self._part: Path | None = None  # the part being shipped
        self._remaining: list[SpillRecord] = []  # its records not yet acknowledged
        self._counts: Counter[str] = Counter()  # its records per signal, for the replayed counter

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="kotel-spill-replay")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        backoff = Backoff(self._retry)
        exhausted_logged = False
        while True:
            await self._spill.wait_for_parts()
            wait = self._breaker.retry_in()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            if not self._breaker.allow():  # half-open, and the probe is out
                await asyncio.sleep(0.1)
                continue
            try:
                shipped = await self._ship_oldest()
            except Exception:  # a bug or an unreadable disk must not end replay for good
                log.exception("spill replay failed")
                shipped = False
            if shipped:
                self._breaker.record_success()
                backoff.reset()
                exhausted_logged = False
                continue
            self._breaker.record_failure()
            try:
                delay = next(backoff)
            except StopIteration:
                delay = self._retry.max_interval.total_seconds()
                if not exhausted_logged:
                    exhausted_logged = True
                    log.error("Kafka has been unreachable for longer than %s; the spill keeps %d parts "
                              "(%d bytes) and replay keeps trying every %.0f s", self._retry.max_elapsed_time,
                              self._spill.part_count, self._spill.used_bytes, delay)
            await asyncio.sleep(delay)

    async def _ship_oldest(self) -> bool:
        """Send (what is left of) the oldest part; True once it is acknowledged and deleted."""
        if not self._healthy:
            self._healthy = await self._sender.metadata_ok(self._timeout)
            if not self._healthy:
                return False
        first = self._spill.first_part()
        assert first is not None  # only the replayer removes parts
        if first != self._part:
            try:
                records = await self._spill.read(first)
            except Exception:
                log.exception("spill part %s is unreadable; moved aside as .corrupt, not replayed", first)
                await asyncio.shield(self._spill.remove(first, corrupt=True))
                return True
            self._part, self._remaining = first, records
            self._counts = Counter(record.signal for record in records)
        failed = await self._sender.send(self._remaining, self._timeout)
        if failed:
            log.warning("replay of %s: %d of %d records not acknowledged; retrying", first.name,
                        len(failed), len(self._remaining))
            self._remaining, self._healthy = failed, False
            return False
        if self._metrics is not None:  # replayed once acknowledged, whatever happens to the file
            for signal, count in self._counts.items():
                self._metrics.replayed.labels(signal).inc(count)
        await asyncio.shield(self._spill.remove(first))
        self._part, self._remaining, self._counts = None, [], Counter()
        return True
