"""The replay's range arguments as text: times, offsets, partition lists. Pure, so unit-tested alone."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_RELATIVE = re.compile(r"-(\d+(?:\.\d+)?)\s*(s|m|h|d|w)")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class ReplayError(ValueError):
    """Bad input on the command line; the message is the one line the user sees (exit 2)."""


def parse_time(text: str, now: datetime) -> int:
    """Epoch milliseconds of ISO-8601 text (naive means UTC), ``now``, or a relative ``-2h``."""
    value = text.strip()
    if value == "now":
        return _ms(now)
    relative = _RELATIVE.fullmatch(value)
    if relative:
        amount, unit = float(relative.group(1)), relative.group(2)
        return _ms(now - timedelta(**{_UNITS[unit]: amount}))
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ReplayError(
            f"invalid time {text!r}: expected ISO-8601 (2024-06-01T10:00:00Z) or relative (-30m, -2h, -1d)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return _ms(moment)


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def iso(ms: int | None) -> str | None:
    """A record timestamp for people: ISO-8601 UTC with milliseconds."""
    if ms is None or ms < 0:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_partitions(text: str) -> list[int]:
    """``0,2`` or ``0-3`` (or both, ``0-2,5``): sorted, without repeats."""
    out: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()) or (sep and int(hi) < int(lo)):
            raise ReplayError(f"invalid --partitions {text!r}: expected partition numbers such as 0,2 or 0-3")
        out.update(range(int(lo), int(hi if sep else lo) + 1))
    return sorted(out)


def parse_offsets(text: str, option: str) -> int | dict[int, int]:
    """One offset for every partition (``1200``) or per partition (``0:1200,2:900``)."""
    value = text.strip()
    if value.isdigit():
        return int(value)
    pairs: dict[int, int] = {}
    for part in value.split(","):
        partition, sep, offset = part.strip().partition(":")
        if not sep or not partition.isdigit() or not offset.isdigit() or int(partition) in pairs:
            raise ReplayError(
                f"invalid {option} {text!r}: expected an offset (1200) or partition:offset "
                "pairs (0:1200,2:900)"
            )
        pairs[int(partition)] = int(offset)
    return pairs


def parse_duration(text: str, option: str) -> float:
    """Seconds of ``90s``, ``5m``, ``1h`` or a bare number of seconds."""
    value = text.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?", value)
    if not match:
        raise ReplayError(f"invalid {option} {text!r}: expected a duration such as 90s, 5m or 1h")
    return timedelta(**{_UNITS[match.group(2) or "s"]: float(match.group(1))}).total_seconds()
