"""The agent's way into Kafka: idempotent producer, retry and circuit breaker, Parquet spill and replay.

Use :class:`Publisher`; the other names are exported for tests and tools that inspect a spill.
"""

from agents.publish.producer import Publisher, producer_config
from agents.publish.spill import Spill, SpillInUse, SpillRecord, read_part
from kotel.resilience.breaker import BreakerState, CircuitBreaker
from kotel.resilience.retry import Backoff

__all__ = [
    "Backoff",
    "BreakerState",
    "CircuitBreaker",
    "Publisher",
    "Spill",
    "SpillInUse",
    "SpillRecord",
    "producer_config",
    "read_part",
]
