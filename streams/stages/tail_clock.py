"""Event time for tail sampling: a low watermark from the regroup side to the deciding side.

The deduped topic's partitions lag by different amounts, so the latest input time a trace partition has
seen says nothing about what a lagging source partition has yet to deliver: deciding on it dropped the
spans of the laggard. Instead, as Kafka Streams and Flink do, each regrouper stamps every bundle with
its low watermark: the slowest clock of the source partitions it holds (`RegroupClock`). A source
partition's clock is its last record's time plus the time since it came, so an idle, caught-up
partition moves on with the wall clock while a lagging one, delivering old records, holds it back. A
partition that has delivered nothing since it was assigned tells nothing and does not count.

The deciding side (`DecisionClock`, one per repartition partition) keeps the last watermark heard from
each regrouper and decides on the lowest, each advancing with the time since it was heard, so a
regrouper that died or went idle never stalls decisions. Bundles without the headers (written before
this scheme) count as they always did: the latest input time. Everything here takes the time as
arguments (wall clock ms, monotonic seconds), so it is tested without a broker or a sleep.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

WATERMARK_HEADER = "kotel.watermark"
REGROUPER_HEADER = "kotel.regrouper"
_MAX_ID = 64
_MAX_DIGITS = 18  # fits the int64 fields the clock is logged in
_LATEST = b""  # DecisionClock's entry for bundles without headers; never a regrouper's id (checked)

Headers = Sequence[tuple[str, bytes | None]]


class BadWatermark(ValueError):
    """A bundle's watermark headers are malformed; the bundle counts as one without them."""


def watermark_headers(regrouper: bytes, watermark_ms: int) -> list[tuple[str, bytes]]:
    return [(WATERMARK_HEADER, b"%d" % watermark_ms), (REGROUPER_HEADER, regrouper)]


def without_watermark(headers: Headers) -> list[tuple[str, bytes | None]]:
    """``headers`` without watermark headers (a regrouper's input must not carry another's)."""
    return [(k, v) for k, v in headers if k not in (WATERMARK_HEADER, REGROUPER_HEADER)]


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


def _since_ms(mono: float, at: float) -> int:
    return round((mono - at) * 1000)


class RegroupClock:
    """Regroup side: the low watermark over the source partitions this worker holds."""

    def __init__(self) -> None:
        self._partitions: dict[Hashable, tuple[int, float]] = {}  # last record ms, monotonic s admitted

    def admitted(self, partition: Hashable, stamp_ms: int, mono: float) -> None:
        """A record of ``partition`` with timestamp ``stamp_ms`` was admitted at monotonic ``mono``."""
        self._partitions[partition] = (stamp_ms, mono)

    def keep(self, assigned: Iterable[Hashable]) -> None:
        """Forget the partitions not in ``assigned`` (revoked in a rebalance)."""
        keep = set(assigned)
        for partition in [p for p in self._partitions if p not in keep]:
            del self._partitions[partition]

    def watermark(self, now_ms: int, mono: float) -> int:
        """The slowest partition's clock, capped at the wall clock ``now_ms``."""
        clocks = (ms + _since_ms(mono, at) for ms, at in self._partitions.values())
        return min(now_ms, min(clocks, default=now_ms))


class DecisionClock:
    """Deciding side: one repartition partition's clock, the lowest of its regroupers' watermarks.

    An entry stops counting once its clock reaches the wall clock or once nothing was heard from it
    for ``expire_ms``: a regrouper that died while behind would otherwise hold decisions back by its
    lag for ever. Its source partitions then belong to another regrouper, which says how far they are.
    """

    def __init__(self, expire_ms: int) -> None:
        self.expire_ms = expire_ms
        # regrouper id -> (watermark ms, monotonic s heard); b"" (no regrouper's id): the latest input
        # time of bundles without headers, or the clock the partition was taken over at
        self._entries: dict[bytes, tuple[int, float]] = {}

    def seed(self, clock_ms: int, mono: float) -> None:
        """Start over from a logged clock (a partition taken over), which counts like a regrouper's:
        the regroupers heard by the previous owner may still be behind."""
        self._entries = {_LATEST: (clock_ms, mono)}

    def heard(self, regrouper: bytes, watermark_ms: int, mono: float) -> None:
        self._entries[regrouper] = (watermark_ms, mono)

    def unmarked(self, stamp_ms: int, mono: float) -> None:
        """A bundle without (valid) watermark headers: the latest input time, as before watermarks."""
        base = self._entries.get(_LATEST, (0, 0.0))[0]
        self._entries[_LATEST] = (max(base, stamp_ms), mono)

    def __len__(self) -> int:
        return len(self._entries)

    def now(self, now_ms: int, mono: float) -> int:
        """The decision clock, capped at the wall clock ``now_ms``; drops entries that stopped counting."""
        clock = now_ms
        for key, (ms, at) in list(self._entries.items()):
            since = _since_ms(mono, at)
            if ms + since >= now_ms or since >= self.expire_ms:
                del self._entries[key]
            else:
                clock = min(clock, ms + since)
        return clock
