"""Histogram points as values that add up (for delta accumulation) and become classic buckets.

Exponential histograms become classic `le` buckets at powers of two. Prometheus 2.x accepts native
histograms over remote write only behind a feature flag, so kotel sends what every receiver reads.
Why powers of two: an exponential bucket at scale s >= 0 nests exactly inside one bucket at scale 0
(index >> s), so counts are merged, never split or interpolated, and `_bucket{le="+Inf"}` equals the
source count. The `le` values are the same whatever scale an SDK chose (scales below 0 have bounds that
are powers of two as well), so `sum by (le)` and `histogram_quantile` work across series and over time,
and a series has one bucket per doubling of its value range (1 ms to 1000 s: 20 buckets). The price is a
resolution of a factor of two, close to Prometheus' own default buckets.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from opentelemetry.proto.metrics.v1.metrics_pb2 import ExponentialHistogramDataPoint, HistogramDataPoint


@dataclass(frozen=True, slots=True)
class HistogramValue:
    """An explicit-bucket histogram point (per-bucket counts, as OTLP has them)."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    count: int
    sum: float | None

    @classmethod
    def of(cls, point: HistogramDataPoint) -> HistogramValue:
        total = point.sum if point.HasField("sum") else None
        return cls(tuple(point.explicit_bounds), tuple(point.bucket_counts), point.count, total)

    def plus(self, other: HistogramValue) -> HistogramValue | None:
        """The sum of two deltas; None when the bucket layout changed (the series restarts)."""
        if other.bounds != self.bounds or len(other.counts) != len(self.counts):
            return None
        total = None if self.sum is None or other.sum is None else self.sum + other.sum
        counts = tuple(a + b for a, b in zip(self.counts, other.counts, strict=True))
        return HistogramValue(self.bounds, counts, self.count + other.count, total)

    def buckets(self) -> list[tuple[float, int]]:
        """Cumulative (le, count) pairs without `+Inf` (that one is always the point's count)."""
        running, out = 0, []
        for index, bound in enumerate(self.bounds):
            running += self.counts[index] if index < len(self.counts) else 0
            out.append((bound, running))
        return out


def _downscaled(buckets: dict[int, int], shift: int) -> dict[int, int]:
    if shift == 0:
        return buckets
    out: dict[int, int] = {}
    for index, count in buckets.items():
        out[index >> shift] = out.get(index >> shift, 0) + count  # >> floors, also for negative indexes
    return out


def _dense(offset: int, counts: Iterable[int], shift: int) -> dict[int, int]:
    return _downscaled({offset + i: c for i, c in enumerate(counts) if c}, shift)


@dataclass(frozen=True, slots=True)
class ExpHistogramValue:
    """An exponential histogram point, downscaled to scale <= 0 (bounds at powers of two)."""

    scale: int
    zero_threshold: float
    zero_count: int
    positive: dict[int, int]
    negative: dict[int, int]
    count: int
    sum: float | None

    @classmethod
    def of(cls, point: ExponentialHistogramDataPoint) -> ExpHistogramValue:
        shift = max(point.scale, 0)
        return cls(min(point.scale, 0), point.zero_threshold, point.zero_count,
                   _dense(point.positive.offset, point.positive.bucket_counts, shift),
                   _dense(point.negative.offset, point.negative.bucket_counts, shift),
                   point.count, point.sum if point.HasField("sum") else None)  # fmt: skip

    def plus(self, other: ExpHistogramValue) -> ExpHistogramValue:
        """The sum of two deltas, at the coarser of their scales (never a restart)."""
        scale = min(self.scale, other.scale)
        positive = _merged(_downscaled(self.positive, self.scale - scale),
                           _downscaled(other.positive, other.scale - scale))  # fmt: skip
        negative = _merged(_downscaled(self.negative, self.scale - scale),
                           _downscaled(other.negative, other.scale - scale))  # fmt: skip
        total = None if self.sum is None or other.sum is None else self.sum + other.sum
        return ExpHistogramValue(scale, max(self.zero_threshold, other.zero_threshold),
                                 self.zero_count + other.zero_count, positive, negative,
                                 self.count + other.count, total)  # fmt: skip

    def buckets(self) -> list[tuple[float, int]]:
        """Cumulative (le, count) pairs without `+Inf`, from the most negative bound up."""
        step = 1 << -self.scale  # bucket i covers (2**(i*step), 2**((i+1)*step)]
        out: list[tuple[float, int]] = []
        running = 0

        def add(le: float, count: int) -> None:
            nonlocal running
            running += count
            if out and le <= out[-1][0]:  # bounds that coincide after rounding, or inside the zero bucket
                out[-1] = (out[-1][0], running)
            else:
                out.append((le, running))

        for index in sorted(self.negative, reverse=True):
            # upper bound of [-2**((i+1)*step), -2**(i*step)); no double lies beyond 2**1024
            add(-_power_of_two(min(index * step, 1023)), self.negative[index])
        if self.zero_count or self.negative:
            add(self.zero_threshold, self.zero_count)
        for index in sorted(self.positive):
            exponent = (index + 1) * step
            if exponent >= 1024:  # beyond the largest double: only `+Inf` can hold these
                break
            add(_power_of_two(exponent), self.positive[index])
        return out


def _power_of_two(exponent: int) -> float:
    return math.ldexp(1.0, max(exponent, -1074))


def _merged(a: dict[int, int], b: dict[int, int]) -> dict[int, int]:
    out = dict(a)
    for index, count in b.items():
        out[index] = out.get(index, 0) + count
    return out


def bucket_for(value: float, buckets: Iterable[tuple[float, int]]) -> float:
    """The `le` of the bucket an exemplar of this value belongs to (`+Inf` when above every bound)."""
    return next((le for le, _ in buckets if value <= le), math.inf)

