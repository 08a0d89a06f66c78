"""Delta points made cumulative per series, the state a Prometheus sink owns.

Prometheus only understands cumulative counters, so (as the Collector's deltatocumulative processor
does) each delta is added to the running total of its series and the total is sent. Rules:
- the first point of a series starts its total;
- a redelivered copy of the last point (same start and time) yields the same total again, so a batch
  translated twice after a failed send does not count twice;
- a point not newer than the last one, or starting before it ended, overlaps what was counted: dropped;
- a histogram whose bucket layout changed restarts its series (Prometheus sees a counter reset);
- `forget` (a staleness marker) and eviction of the least recently used series beyond `max_series`
  restart a series too, which again reads as a counter reset, the safe direction for `rate()`.
The state lives in memory: after a restart every series starts again from its next delta.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TypeVar

from streams.sinks.prom_translate_histograms import ExpHistogramValue, HistogramValue

Value = float | HistogramValue | ExpHistogramValue
V = TypeVar("V", float, HistogramValue, ExpHistogramValue)


@dataclass(slots=True)
class _State:
    start_ns: int
    time_ns: int
    total: Value


def _plus(total: Value, delta: Value) -> Value | None:
    if isinstance(total, float) and isinstance(delta, float):
        return total + delta
    if isinstance(total, HistogramValue) and isinstance(delta, HistogramValue):
        return total.plus(delta)
    if isinstance(total, ExpHistogramValue) and isinstance(delta, ExpHistogramValue):
        return total.plus(delta)
    return None  # a series that changed type restarts


class DeltaAccumulator:
    """Running totals of delta series, keyed by the caller's series identity."""

    def __init__(self, max_series: int = 100_000) -> None:
        if max_series < 1:
            raise ValueError(f"max_series must be at least 1, got {max_series}")
        self.max_series = max_series
        self.evicted = 0
        self._series: OrderedDict[Hashable, _State] = OrderedDict()

    def __len__(self) -> int:
        return len(self._series)

    def add(self, key: Hashable, start_ns: int, time_ns: int, delta: V) -> V | None:
        """The cumulative value after this delta, or None when the point overlaps what was counted."""
        state = self._series.get(key)
        if state is None:
            self._store(key, _State(start_ns, time_ns, delta))
            return delta
        self._series.move_to_end(key)
        if start_ns == state.start_ns and time_ns == state.time_ns:
            return state.total  # type: ignore[return-value]
        if time_ns <= state.time_ns or (start_ns and start_ns < state.time_ns):
            return None
        total = _plus(state.total, delta)
        state.start_ns, state.time_ns, state.total = start_ns, time_ns, delta if total is None else total
        return state.total  # type: ignore[return-value]

    def forget(self, key: Hashable) -> None:
        self._series.pop(key, None)

    def _store(self, key: Hashable, state: _State) -> None:
        self._series[key] = state
        while len(self._series) > self.max_series:
            self._series.popitem(last=False)
            self.evicted += 1
