"""The replay loop: read a chunk, filter, deliver (retrying), dead-letter refusals, then checkpoint.

A chunk's positions and statistics reach the checkpoint only after every record of it was
acknowledged by the target or by the dead-letter topic; that ordering is the whole resume guarantee.
A dry run is the same loop without a target, so its figures are those of a real run by construction.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from kotel.resilience import Backoff
from kotel.topology.exporters import RetryConfig
from streams.replay.checkpoint import Checkpoint
from streams.replay.kafka_io import Read, TargetFailed
from streams.replay.plan import Unit, UnitStats
from streams.replay.progress import Display, RateLimiter
from streams.replay.records import Filters, count_items, redriven
from streams.replay.timespec import iso
from streams.sinks.runtime import Deliverer, Outcome, Result, SinkRecord


class Source(Protocol):
    def read(self, max_records: int, timeout: float) -> list[Read] | None: ...

    def positions(self) -> dict[str, int]: ...

    def close(self) -> None: ...


class DeadLetterSink(Protocol):
    def send(self, failed: Sequence[tuple[SinkRecord, str]]) -> None:
        """Blocking; returns once every record is acknowledged, raises otherwise."""
        ...


class TargetRefused(RuntimeError):
    """The target kept answering "retry" past the retry budget; the checkpoint holds the position."""


class Interrupted(Exception):
    """Stopped (Ctrl-C, SIGTERM) while a chunk was unacknowledged: it is sent again on --resume."""


@dataclass
class ReplayResult:
    units: list[Unit]
    seconds: float
    complete: bool

    def totals(self) -> UnitStats:
        total = UnitStats()
        for unit in self.units:
            s = unit.stats
            total.records += s.records
            total.items += s.items
            total.skipped += s.skipped
            total.dead_lettered += s.dead_lettered
            total.first_ts = _min(total.first_ts, s.first_ts)
            total.last_ts = _max(total.last_ts, s.last_ts)
        return total

    def summary(self, **about: Any) -> dict[str, Any]:
        """The JSON summary: per unit and in total, plus whatever ``about`` says (job, source, target)."""

        def one(stats: UnitStats) -> dict[str, Any]:
            out = {k: v for k, v in asdict(stats).items() if k not in ("first_ts", "last_ts")}
            return {
                **out,
                "delivered": stats.delivered,
                "first_timestamp": iso(stats.first_ts),
                "last_timestamp": iso(stats.last_ts),
            }

        partitions = [
            {
                "unit": u.key,
                "partition": u.partition,
                "start": u.start,
                "end": u.end,
                "next": u.next,
                **one(u.stats),
            }
            for u in self.units
        ]
        totals = one(self.totals())
        for key in ("first_offset", "last_offset"):
            totals.pop(key)
        return {
            **about,
            "complete": self.complete,
            "seconds": round(self.seconds, 3),
            "partitions": partitions,
            "totals": totals,
        }


def _min(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _max(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def _merge(into: UnitStats, delta: UnitStats) -> None:
    into.records += delta.records
    into.items += delta.items
    into.skipped += delta.skipped
    into.dead_lettered += delta.dead_lettered
    into.first_offset = _min(into.first_offset, delta.first_offset)
    into.last_offset = _max(into.last_offset, delta.last_offset)
    into.first_ts = _min(into.first_ts, delta.first_ts)
    into.last_ts = _max(into.last_ts, delta.last_ts)


async def replay(
    source: Source,
    units: Sequence[Unit],
    filters: Filters,
    target: Deliverer | None,
    *,
    dead_letter: DeadLetterSink | None = None,
    checkpoint: Checkpoint | None = None,
    display: Display | None = None,
    limiter: RateLimiter | None = None,
    batch: int = 1000,
    retry: RetryConfig | None = None,
    stop: asyncio.Event | None = None,
) -> ReplayResult:
    """Replay every unit to its end (``target=None``: a dry run that reads and counts only)."""
    started = time.monotonic()
    stop = stop or asyncio.Event()
    backoff = Backoff(retry or RetryConfig(initial_interval="500ms", max_elapsed_time="5m"))
    by_key = {u.key: u for u in units}
    # One chunk is read (and filtered and counted) ahead while the current one is delivered: the
    # source's waits and the target's writes overlap. Only one read is ever in flight.
    ahead: asyncio.Future[_Chunk | None] | None = asyncio.ensure_future(
        asyncio.to_thread(_next_chunk, source, batch, filters)
    )
    try:
        while not stop.is_set() and ahead is not None:
            chunk = await ahead
            ahead = None
            if chunk is None:
                break
            ahead = asyncio.ensure_future(asyncio.to_thread(_next_chunk, source, batch, filters))
            if not chunk.reads and all(chunk.positions.get(u.key, u.next) == u.next for u in units):
                continue  # an idle poll (waiting for records in range): nothing to checkpoint
            if chunk.accepted and target is not None:
                if limiter is not None:
                    await limiter.take(len(chunk.accepted))
                failed = await _deliver(target, chunk.accepted, filters.redrive, backoff, stop)
                if failed:
                    if dead_letter is None:
                        raise RuntimeError(
                            f"{target.name} refused {len(failed)} record(s) for good and there is no "
                            f"Kafka to dead-letter them: {failed[0][1]}"
                        )
                    await asyncio.to_thread(dead_letter.send, failed)
                    for record, _reason in failed:
                        chunk.deltas[_unit_key(record, chunk.reads)].dead_lettered += 1
            for key, delta in chunk.deltas.items():
                _merge(by_key[key].stats, delta)
            for unit in units:
                unit.next = chunk.positions.get(unit.key, unit.next)
            if checkpoint is not None:
                checkpoint.done = all(u.done for u in units)
                await asyncio.to_thread(checkpoint.save)
            if display is not None:
                display.update()
    finally:
        if ahead is not None:  # the source may be closed only once no read runs in it
            with contextlib.suppress(Exception):
                await ahead
    complete = all(u.done for u in units)
    if checkpoint is not None and complete and not checkpoint.done:
        checkpoint.done = True
        await asyncio.to_thread(checkpoint.save)
    return ReplayResult(list(units), time.monotonic() - started, complete)


@dataclass
class _Chunk:
    reads: list[Read]
    positions: dict[str, int]  # the source's positions right after this chunk was read
    deltas: dict[str, UnitStats]  # what the chunk adds to each unit's statistics once acknowledged
    accepted: list[SinkRecord]  # the records the filters let through


def _next_chunk(source: Source, batch: int, filters: Filters) -> _Chunk | None:
    """Read, filter and count one chunk (in a worker thread); None once the source is exhausted."""
    reads = source.read(batch, 0.5)
    if reads is None:
        return None
    deltas: dict[str, UnitStats] = {}
    accepted: list[SinkRecord] = []
    for unit, position, record in reads:
        delta = deltas.get(unit.key)
        if delta is None:
            delta = deltas[unit.key] = UnitStats()
        delta.records += 1
        delta.first_offset = _min(delta.first_offset, position)
        delta.last_offset = _max(delta.last_offset, position)
        if record.timestamp_ms >= 0:
            delta.first_ts = _min(delta.first_ts, record.timestamp_ms)
            delta.last_ts = _max(delta.last_ts, record.timestamp_ms)
        if not filters.accepts(record):
            delta.skipped += 1
            continue
        delta.items += count_items(record.signal, record.value)
        accepted.append(record)
    return _Chunk(reads, source.positions(), deltas, accepted)


def _unit_key(record: SinkRecord, reads: Sequence[Read]) -> str:
    for unit, _position, read in reads:
        if read is record:
            return unit.key
    raise LookupError("dead-lettered record not in its chunk")


async def _deliver(
    target: Deliverer, records: list[SinkRecord], redrive: bool, backoff: Backoff, stop: asyncio.Event
) -> list[tuple[SinkRecord, str]]:
    """Deliver until each record is accepted or refused for good; the refused ones with the reason.

    The refused are returned as read from the source (a re-driven dead letter keeps its dlq headers
    there), so their dead-letter record names where they were read from.
    """
    pending = records
    failed: list[tuple[SinkRecord, str]] = []
    last = ""
    while pending:
        sent = [redriven(r) for r in pending] if redrive else pending
        try:
            results = await target.deliver(sent)
        except TargetFailed:
            raise
        except Exception as exc:  # a deliverer that raised instead of answering: retry, like the sinks do
            results = [Result(Outcome.RETRY, f"{type(exc).__name__}: {exc}")] * len(pending)
        retry: list[SinkRecord] = []
        hint = 0.0
        for record, result in zip(pending, results, strict=True):
            if result.outcome is Outcome.PERMANENT:
                failed.append((record, f"replay to {target.name}: {result.reason}"))
            elif result.outcome is Outcome.RETRY:
                retry.append(record)
                hint, last = max(hint, result.retry_after), result.reason
        if not retry:
            backoff.reset()
            return failed
        try:
            delay = max(hint, next(backoff))
        except StopIteration:
            raise TargetRefused(
                f"{target.name} kept refusing for {backoff.elapsed:.0f}s ({last or 'retry'})"
            ) from None
        try:
            await asyncio.wait_for(stop.wait(), delay)
            raise Interrupted()
        except TimeoutError:
            pass
        pending = retry
    return failed
