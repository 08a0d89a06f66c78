"""Admission control (seed §3.1): a bounded in-flight budget and the memory limiter.

Bytes are admitted when a request arrives and released once it is durable, so the budget bounds
what the agent holds in memory. Above the high-water mark the agent degrades (cheaper data);
at the limit it refuses with a retryable answer instead of queueing without bound.
"""

from __future__ import annotations

from agents.contracts import Overloaded
from agents.processors import MemoryLimiter
from agents.telemetry import AgentMetrics
from kotel.topology.exporters import BackpressureConfig


class Admission:
    def __init__(self, config: BackpressureConfig, metrics: AgentMetrics,
                 memory: MemoryLimiter | None = None) -> None:
        self.capacity = config.max_in_flight_mib * 1024 * 1024
        self.high_water = config.high_water_mark
        self.retry_after = config.retry_after.total_seconds()
        self.memory = memory
        self.metrics = metrics
        self.in_flight = 0

    @property
    def utilisation(self) -> float:
        return self.in_flight / self.capacity

    @property
    def degraded(self) -> bool:
        return self.utilisation > self.high_water

    def acquire(self, size: int) -> None:
        if self.memory is not None and self.memory.should_refuse():
            raise Overloaded("the agent is above its memory limit (memory_limiter); retry later",
                             self.retry_after, reason="memory_limiter")
        if self.in_flight + size > self.capacity:
            raise Overloaded(
                f"the agent's in-flight budget is full ({self.in_flight} of {self.capacity} bytes); "
                "retry later",
                self.retry_after, reason="backpressure",
            )
        self.in_flight += size
        self._report()

    def release(self, size: int) -> None:
        self.in_flight = max(0, self.in_flight - size)
        self._report()

    def _report(self) -> None:
        self.metrics.queue_utilisation.set(self.utilisation)
        self.metrics.degraded.set(1 if self.degraded else 0)
