"""Exponential backoff with jitter, as the Collector's ``retry_on_failure`` block describes it.

Hand-written rather than taken from tenacity or backoff: those drive a call for you, while the spill
replayer needs only the next delay (it sleeps on its own stop event), and tests need an injected clock.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator

from kotel.topology.exporters import RetryConfig


class Backoff(Iterator[float]):
    """Delays to wait before each retry; exhausted once ``max_elapsed_time`` would be exceeded.

    The n-th delay is ``initial * multiplier**n`` capped at ``max_interval``, then spread uniformly over
    ``[d * (1 - r), d * (1 + r)]`` with r = ``randomization_factor``, so agents that lost Kafka together
    do not reconnect together. Elapsed time counts from construction or the last :meth:`reset` (a
    success) by ``clock``; a ``max_elapsed_time`` of 0 means never exhausted. A disabled config yields
    nothing: the first failure is final.
    """

    def __init__(
        self,
        config: RetryConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._clock = clock
        self._rng = rng or random.Random()
        self._initial = config.initial_interval.total_seconds()
        self._max_interval = config.max_interval.total_seconds()
        self._max_elapsed = config.max_elapsed_time.total_seconds()
        self.reset()

    def reset(self) -> None:
        """Start over from the initial interval; call after a success."""
        self._interval = self._initial
        self._started = self._clock()

    @property
    def elapsed(self) -> float:
        return self._clock() - self._started

    def __next__(self) -> float:
        if not self._config.enabled:
            raise StopIteration
        factor = self._config.randomization_factor
        delay = self._interval * (1 + factor * self._rng.uniform(-1.0, 1.0))
        if self._max_elapsed and self.elapsed + delay > self._max_elapsed:
            raise StopIteration
        self._interval = min(self._interval * self._config.multiplier, self._max_interval)
        return delay
