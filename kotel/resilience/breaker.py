"""The Kafka circuit breaker (seed §3.3): stop waiting on a Kafka that is down, probe it now and then.

Hand-written rather than pybreaker/aiobreaker: those trip on consecutive failures, while the config asks
for a failure *rate* over a time window with a minimum number of calls, and tests need an injected
clock. The breaker is pure state: it never sleeps or calls Kafka, and runs on the event loop's thread
(librdkafka's callbacks reach it through ``loop.call_soon_threadsafe``).
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable

from kotel.topology.exporters import CircuitBreakerConfig


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """closed -> open above the failure rate; open -> half-open after ``open_duration``; one probe decides.

    Closed: every call is allowed; outcomes within the last ``window`` seconds are kept, and once there
    are at least ``minimum_requests`` of them and the share of failures exceeds (strictly)
    ``failure_rate_threshold``, the breaker opens. Open: nothing is allowed until ``open_duration`` has
    passed, then the next :meth:`allow` is the probe (half-open). Half-open: that probe's success closes
    the breaker with an empty window, its failure opens it again. A probe that never reports back (its
    caller was cancelled) is replaced by another after ``open_duration``. :meth:`trip` opens at once,
    for when librdkafka says every broker is down. A disabled breaker allows everything, always.
    """

    def __init__(
        self,
        config: CircuitBreakerConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self._config = config
        self._clock = clock
        self._on_change = on_change
        self._window = config.window.total_seconds()
        self._open_for = config.open_duration.total_seconds()
        self._outcomes: deque[tuple[float, bool]] = deque()  # (time, failed)
        self._failures = 0
        self._state = BreakerState.CLOSED
        self._since = clock()  # when the current state (or the current probe) began

    @property
    def state(self) -> BreakerState:
        """The state as of now; an open breaker whose time is up reads as half-open."""
        if self._state is BreakerState.OPEN and self._clock() - self._since >= self._open_for:
            return BreakerState.HALF_OPEN
        return self._state

    def retry_in(self) -> float:
        """Seconds until :meth:`allow` may let a call through again (0 when it would now)."""
        if self._state is BreakerState.CLOSED or not self._config.enabled:
            return 0.0
        return max(0.0, self._since + self._open_for - self._clock())

    def allow(self) -> bool:
        """May a call go to Kafka now? In half-open, True exactly once: that call is the probe."""
        if not self._config.enabled or self._state is BreakerState.CLOSED:
            return True
        if self._clock() - self._since < self._open_for:
            return False
        # Open and its time is up, or half-open with a probe that never reported: (re)issue the probe.
        self._set(BreakerState.HALF_OPEN)
        return True

    def record_success(self) -> None:
        if not self._config.enabled:
            return
        if self._state is BreakerState.HALF_OPEN:
            self._outcomes.clear()
            self._failures = 0
            self._set(BreakerState.CLOSED)
        elif self._state is BreakerState.CLOSED:
            self._add(failed=False)

    def record_failure(self) -> None:
        if not self._config.enabled:
            return
        if self._state is BreakerState.HALF_OPEN:
            self._set(BreakerState.OPEN)
        elif self._state is BreakerState.CLOSED:
            self._add(failed=True)
            total = len(self._outcomes)
            if total >= self._config.minimum_requests and (
                self._failures / total > self._config.failure_rate_threshold
            ):
                self._set(BreakerState.OPEN)

    def trip(self) -> None:
        """Open now (librdkafka reported all brokers down); an open breaker restarts its wait."""
        if self._config.enabled:
            self._set(BreakerState.OPEN)

    def _add(self, *, failed: bool) -> None:
        now = self._clock()
        self._outcomes.append((now, failed))
        self._failures += failed
        while self._outcomes and self._outcomes[0][0] <= now - self._window:
            _, old_failed = self._outcomes.popleft()
            self._failures -= old_failed

    def _set(self, state: BreakerState) -> None:
        changed = state is not self._state
        self._state = state
        self._since = self._clock()
        if changed and self._on_change is not None:
            self._on_change(state)
