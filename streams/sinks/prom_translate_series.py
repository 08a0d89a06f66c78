"""Encoded label sets cached per series, and a request's samples gathered per series as wire bytes.

Translating labels (sanitising names, attribute texts, merging resource, scope, job/instance and
external labels, sorting) costs far more than a sample, and a sink sees the same series in every
batch. So a point's attributes, as the bytes upb hands over, key a `Series` holding its sorted label
set and, per metric name (and `le` / `quantile`), the finished remote-write label bytes. Bounded: past
`max_entries` label sets the cache starts afresh and counts a reset.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from streams.sinks.wire import field as wire_field
from streams.sinks.wire import label_pair, sample, sample_time, varint

LabelKey = tuple[tuple[str, str], ...]
Extra = tuple[str, str] | None


def with_name(base: LabelKey, name: str, extra: Extra = None) -> LabelKey:
    """A series' labels: a point's (sorted, non-empty) plus `__name__` and `le` / `quantile`, which win."""
    items = [("__name__", name), *base]
    if extra:
        items = [pair for pair in items if pair[0] != extra[0]]
        items.append(extra)
    items.sort()  # nearly sorted already: cheap
    return tuple(items)


def _label_block(pair: tuple[str, str]) -> bytes:
    """One label as it sits inside a TimeSeries (field 1)."""
    return wire_field(0x0A, label_pair(*pair))


class Series:
    """One point label set (without `__name__`) and the encoded label sets derived from it."""

    __slots__ = ("key", "named", "splits")

    def __init__(self, key: LabelKey) -> None:
        self.key = key
        self.named: dict[Hashable, Any] = {}  # name | (name, extra) | (name, les) -> bytes or tuple of bytes
        #: the key's label bytes cut where `__name__` and an extra label go (the key has no `__name__`:
        #: sanitised names never start with `_`), so a new name costs a concatenation, not a sort
        self.splits: dict[str, tuple[bytes, bytes, bytes]] = {}


class SeriesCache:
    """Series by resource-and-scope context, then by the point's attribute bytes."""

    def __init__(self, max_entries: int = 100_000, pair_cache: int = 32_768) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self.resets = 0  # times the cache was full and started afresh
        self._size = 0
        self._contexts: dict[Hashable, dict[tuple[bytes, ...], Series]] = {}
        self._pair: Callable[[tuple[str, str]], bytes] = functools.lru_cache(maxsize=pair_cache)(_label_block)

    def __len__(self) -> int:
        return self._size

    def context(self, key: Hashable) -> dict[tuple[bytes, ...], Series]:
        points = self._contexts.get(key)
        if points is None:
            points = self._contexts[key] = {}
        return points

    def add(self, points: dict[tuple[bytes, ...], Series], attributes: tuple[bytes, ...],
            key: LabelKey) -> Series:  # fmt: skip
        self._grow()
        series = points[attributes] = Series(key)
        return series

    def block(self, labels: LabelKey) -> bytes:
        return b"".join(map(self._pair, labels))

    def named(self, series: Series, name: str, extra: Extra = None) -> bytes:
        """The label bytes of `name` (with `le` / `quantile` when given) over this series' labels."""
        slot: Hashable = (name, extra) if extra else name
        out: bytes | None = series.named.get(slot)
        if out is None:
            self._grow()
            if extra and extra[0] <= "__name__":  # never for `le` and `quantile`
                out = self.block(with_name(series.key, name, extra))
            else:
                split = series.splits.get(extra[0] if extra else "") or self._split(series, extra)
                out = split[0] + self._pair(("__name__", name)) + split[1]
                out += (self._pair(extra) if extra else b"") + split[2]
            series.named[slot] = out
        return out

    def _split(self, series: Series, extra: Extra) -> tuple[bytes, bytes, bytes]:
        """Label bytes before `__name__`, between it and the extra label, and after (extra's own left out)."""
        name = extra[0] if extra else ""
        base = [pair for pair in series.key if pair[0] != name] if name else list(series.key)
        i = next((n for n, pair in enumerate(base) if pair[0] > "__name__"), len(base))
        j = next((n for n, pair in enumerate(base) if pair[0] > name), len(base)) if name else len(base)
        split = series.splits[name] = (self.block(base[:i]), self.block(base[i:j]), self.block(base[j:]))
        return split

    def _grow(self) -> None:
        self._size += 1
        if self._size > self.max_entries:
            self.resets += 1
            self._size = 1
            for points in self._contexts.values():
                points.clear()  # a caller may still hold one: it must not keep the old entries alive
            self._contexts.clear()


@dataclass(slots=True)
class SampleBatch:
    """Samples and exemplars per encoded label set, in first-seen order."""

    samples: dict[bytes, Any] = field(default_factory=dict)  # (ms, value), or {ms: value} once merged
    exemplars: dict[bytes, list[bytes]] = field(default_factory=dict)

    def add(self, labels: bytes, ms: int, value: float, exemplars: list[bytes] | None = None) -> None:
        current = self.samples.get(labels)
        if current is None:
            self.samples[labels] = (ms, value)
        elif type(current) is tuple:  # the same series again: samples by time, the last point wins
            self.samples[labels] = {current[0]: current[1], ms: value}
        else:
            current[ms] = value
        if exemplars:
            self.exemplars.setdefault(labels, []).extend(exemplars)

    def encode(self) -> tuple[list[bytes], list[int]]:
        """Each series as a WriteRequest.timeseries field, and its number of samples."""
        series, counts = [], []
        exemplars = self.exemplars
        times: dict[int, bytes] = {}  # a batch's points share few times: encode each once
        for labels, current in self.samples.items():
            if type(current) is tuple:
                ms = current[0]
                time_field = times.get(ms) or times.setdefault(ms, sample_time(ms))
                body = labels + sample(current[1], time_field)
                counts.append(1)
            else:
                body = labels + b"".join([sample(current[ms], sample_time(ms)) for ms in sorted(current)])
                counts.append(len(current))
            if exemplars and labels in exemplars:
                body += b"".join(exemplars[labels])
            size = len(body)
            series.append(b"\x0a" + (bytes((size,)) if size < 0x80 else varint(size)) + body)
        return series, counts
