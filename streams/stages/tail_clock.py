"""Event time for tail sampling: a low watermark from the regroup side to the deciding side.

The deduped topic's partitions lag by different amounts, so the latest input time a trace partition has
seen says nothing about what a lagging source partition has yet to deliver. Instead, as Kafka Streams and
Flink do, each regrouper stamps every bundle with its low watermark: the slowest clock of the source
partitions it holds (`RegroupClock`). Clocks move only on evidence, never with the wall clock alone: a
broker outage must not let them run on and decide traces whose spans wait in the agents' spills.

A source partition's clock is its last admitted record's time. It moves past that only while the broker,
in a fetch response after that record, says the partition holds nothing newer (highwater <= offset + 1):
then by the fetch time since the record came, unless the stage upstream still has input for it
(`tail_upstream`: dedup working through a backlog). Fetch time across a silence of more than ``POLL_GAP_MS``
(the broker out of reach) is no evidence and does not count, so the clock resumes where it stopped; nor
does fetch time for as long again after it (at most ``OUTAGE_GRACE_MS``), when agents are only starting
to replay what they spilled meanwhile (their retries back off, to 30 s): only records move it then. A
partition that has delivered nothing since it was assigned tells nothing and does not count.

The deciding side (`DecisionClock`, one per repartition partition) keeps the last watermark heard from
each regrouper and decides on the lowest. Regroupers send a heartbeat (a watermark-only record) to each
partition they wrote nothing to for ``HEARTBEAT_MS``, so live ones are always heard; an entry unheard
for ``expire_ms`` of listening time is a dead regrouper's and is dropped. Listening time is the time the
partition heard anything, silences longer than ``LISTEN_GAP_MS`` counted as that: an outage, when no one
is heard, expires no one. With no entry left the clock stays where it was. Bundles without the headers
(written before this scheme) count by their latest record time, as does a takeover's logged clock,
each for ``hold_ms`` of listening (time for every live regrouper to be heard). Everything here takes the
time as arguments (wall clock ms, monotonic seconds), so it is tested without a broker or a sleep.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

WATERMARK_HEADER = "kotel.watermark"
REGROUPER_HEADER = "kotel.regrouper"
HEARTBEAT_HEADER = "kotel.heartbeat"
HEARTBEAT_MS = 1000  # a regrouper's longest silence towards a repartition partition, beyond a round
POLL_GAP_MS = 5000  # no fetch response for this long (they come every 1.5 s when idle): out of reach
LISTEN_GAP_MS = 5 * HEARTBEAT_MS  # a partition's silence counts as listening up to this much
HOLD_MS = 3 * HEARTBEAT_MS  # a takeover's clock or headerless bundles: held until regroupers are heard
OUTAGE_GRACE_MS = 45_000  # after an outage, fetch time counts again at most this much later (spill replays)
_MAX_ID = 64
_MAX_DIGITS = 18  # fits the int64 fields the clock is logged in
_LATEST = b""  # DecisionClock's entry for bundles without headers; never a regrouper's id (checked)

Headers = Sequence[tuple[str, bytes | None]]


class BadWatermark(ValueError):
    """A bundle's watermark headers are malformed; the bundle counts as one without them."""


def watermark_headers(regrouper: bytes, watermark_ms: int) -> list[tuple[str, bytes]]:
    return [(WATERMARK_HEADER, b"%d" % watermark_ms), (REGROUPER_HEADER, regrouper)]


def heartbeat_headers(regrouper: bytes, watermark_ms: int) -> list[tuple[str, bytes]]:
    return [(HEARTBEAT_HEADER, b"1"), *watermark_headers(regrouper, watermark_ms)]


def is_heartbeat(headers: Headers) -> bool:
    return any(k == HEARTBEAT_HEADER for k, _ in headers)


def without_watermark(headers: Headers) -> list[tuple[str, bytes | None]]:
    """``headers`` without watermark headers (a regrouper's input must not carry another's)."""
    own = (WATERMARK_HEADER, REGROUPER_HEADER, HEARTBEAT_HEADER)
    return [(k, v) for k, v in headers if k not in own]


def read_watermark(headers: Headers) -> tuple[bytes, int] | None:
    """(regrouper id, watermark ms) of a bundle; None when it has neither header."""
    found = {k: v for k, v in headers if k in (WATERMARK_HEADER, REGROUPER_HEADER)}
    if not found:
        return None
    mark, regrouper = found.get(WATERMARK_HEADER), found.get(REGROUPER_HEADER)
    if WATERMARK_HEADER not in found or REGROUPER_HEADER not in found:
        missing = REGROUPER_HEADER if REGROUPER_HEADER not in found else WATERMARK_HEADER
        raise BadWatermark(f"bundle has only one watermark header: {missing} is missing")
    if mark is None or not mark.isdigit() or len(mark) > _MAX_DIGITS:
        raise BadWatermark(f"{WATERMARK_HEADER} header {mark!r} is not a decimal number of milliseconds")
    if not regrouper or len(regrouper) > _MAX_ID:
        raise BadWatermark(f"{REGROUPER_HEADER} header {regrouper!r} is not an id of 1 to {_MAX_ID} bytes")
    return regrouper, int(mark)


class Poll(NamedTuple):
    """What the broker last said of a partition: its next offset, and when (wall ms); None: unknown.
    ``upstream_busy``: the stage writing the partition still has input for it (tail_upstream)."""

    highwater: int | None
    at_ms: int | None
    upstream_busy: bool = False


@dataclass(slots=True)
class _Source:
    stamp_ms: int  # the last admitted record's time
    offset: int
    counted_ms: int  # fetch time counted as credit up to here (first: when the record was admitted)
    polled_ms: int  # the latest fetch time seen, records or not (first: the partition's first admission)
    credit_ms: int = 0  # fetch time since the record, out-of-reach silences left out
    lost: bool = False  # no fetch response for POLL_GAP_MS when last looked at
    grace_ms: int = 0  # fetch time before this (the end of an outage's grace) is no evidence


class RegroupClock:
    """Regroup side: the low watermark over the source partitions this worker holds."""

    def __init__(self) -> None:
        self._partitions: dict[Hashable, _Source] = {}

    def admitted(self, partition: Hashable, stamp_ms: int, offset: int, now_ms: int) -> None:
        """Record ``offset`` of ``partition``, with timestamp ``stamp_ms``, was admitted at ``now_ms``."""
        source = self._partitions.get(partition)
        if source is None:
            self._partitions[partition] = _Source(stamp_ms, offset, now_ms, now_ms)
            return
        # A silence and its grace outlive the records that end it (those a stage retried, the spills)
        source.stamp_ms, source.offset, source.counted_ms, source.credit_ms = stamp_ms, offset, now_ms, 0

    def keep(self, assigned: Iterable[Hashable]) -> None:
        """Forget the partitions not in ``assigned`` (revoked in a rebalance)."""
        keep = set(assigned)
        for partition in [p for p in self._partitions if p not in keep]:
            del self._partitions[partition]

    def watermark(self, now_ms: int, poll: Callable[[Hashable], Poll | None]) -> int:
        """The slowest partition's clock, capped at the wall clock ``now_ms``; ``poll`` answers what
        the broker last said of a partition."""
        clocks = [self._clock(source, now_ms, poll(p)) for p, source in self._partitions.items()]
        return min(now_ms, min(clocks, default=now_ms))

    @staticmethod
    def _clock(source: _Source, now_ms: int, poll: Poll | None) -> int:
        at = poll.at_ms if poll is not None else None
        if at is not None and at > source.polled_ms:
            if source.lost:  # as long as the silence, up to OUTAGE_GRACE_MS (agents' backoffs grow with it)
                source.grace_ms = at + min(OUTAGE_GRACE_MS, at - source.polled_ms)
            source.polled_ms, source.lost = at, False
        elif now_ms - source.polled_ms > POLL_GAP_MS:
            source.lost = True  # out of reach: the time until the next fetch response is no evidence
        start = max(source.counted_ms, source.grace_ms)
        if at is not None and at > start:
            source.credit_ms += at - start
            source.counted_ms = at
        caught_up = (poll is not None and not poll.upstream_busy and poll.highwater is not None
                     and poll.highwater <= source.offset + 1)
        return source.stamp_ms + source.credit_ms if caught_up else source.stamp_ms


class DecisionClock:
    """Deciding side: one repartition partition's clock, the lowest of its regroupers' watermarks.

    Never moved by elapsed time: a regrouper that is not heard holds its last watermark until it is heard
    again or expires (``expire_ms`` of listening; ``hold_ms`` for the takeover or headerless entry).
    """

    def __init__(self, expire_ms: int, hold_ms: int = HOLD_MS) -> None:
        self.expire_ms, self.hold_ms = expire_ms, hold_ms
        # regrouper id -> (watermark ms, listening ms when heard); b"" (no regrouper's id): the latest
        # input time of bundles without headers, or the clock the partition was taken over at
        self._entries: dict[bytes, tuple[int, float]] = {}
        self._listened = 0.0  # ms this partition has spent hearing its regroupers
        self._heard_at: float | None = None  # monotonic s anything was last heard
        self._last = 0  # the clock last answered; 0 before anything was known: nothing is due

    def seed(self, clock_ms: int, mono: float) -> None:
        """Start over from a logged clock (a partition taken over), which holds the clock back until
        the live regroupers had time to be heard: those heard by the previous owner may be behind."""
        self._entries = {}
        self._set(_LATEST, clock_ms, mono)
        self._last = clock_ms

    def heard(self, regrouper: bytes, watermark_ms: int, mono: float) -> None:
        self._set(regrouper, watermark_ms, mono)

    def unmarked(self, stamp_ms: int, mono: float) -> None:
        """A bundle without (valid) watermark headers: the latest input time, as before watermarks."""
        base = self._entries.get(_LATEST, (0, 0.0))[0]
        self._set(_LATEST, max(base, stamp_ms), mono)

    def __len__(self) -> int:
        return len(self._entries)

    def now(self, now_ms: int, mono: float) -> int:
        """The decision clock, capped at the wall clock ``now_ms``; drops the entries that expired and
        stays where it was when none is left."""
        listened = self._listening(mono)
        for key, (_, at) in list(self._entries.items()):
            if listened - at >= (self.hold_ms if key == _LATEST else self.expire_ms):
                del self._entries[key]
        if self._entries:
            self._last = min(now_ms, min(ms for ms, _ in self._entries.values()))
        return self._last

    def _set(self, key: bytes, watermark_ms: int, mono: float) -> None:
        self._listened = self._listening(mono)
        self._heard_at = mono
        self._entries[key] = (watermark_ms, self._listened)

    def _listening(self, mono: float) -> float:
        if self._heard_at is None:
            return self._listened
        return self._listened + min(max(0.0, (mono - self._heard_at) * 1000), LISTEN_GAP_MS)
