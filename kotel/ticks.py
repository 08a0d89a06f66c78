"""Batch timeouts as the OpenTelemetry Collector's batch processor keeps them.

Its timer runs whether or not items wait, so an item waits between 0 and the timeout (half of it on
average) for the next tick, instead of a whole timeout counted from the first item of a batch. The
ticks here are a fixed grid of a monotonic clock: the same waits, and an idle process never wakes up.
"""

from __future__ import annotations

import math


def next_tick(now: float, period: float) -> float:
    """The first multiple of ``period`` at or after ``now`` (both in seconds); ``now`` for no period."""
    if period <= 0:
        return now
    return math.ceil(now / period) * period
