"""Retry backoff and circuit breaking, shared by the agent's publisher and the stream sinks."""

from kotel.resilience.breaker import BreakerState, CircuitBreaker
from kotel.resilience.retry import Backoff

__all__ = ["Backoff", "BreakerState", "CircuitBreaker"]
