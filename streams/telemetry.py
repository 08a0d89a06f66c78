"""A stream worker's own metrics, in a registry per worker (several workers may share a process in tests)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from kotel import gc_pauses

__all__ = ["CONTENT_TYPE", "WorkerMetrics"]

# The text format's type without its charset parameter, which aiohttp wants as a separate argument.
CONTENT_TYPE = "text/plain; version=0.0.4"


class WorkerMetrics:
    """Items in / out / duplicates / dead-lettered by stage and signal, table size and consumer lag.

    Table sizes and lag are sampled by callbacks at scrape time, so the hot path only bumps counters.
    """

    def __init__(self, stage: str, registry: CollectorRegistry | None = None) -> None:
        self.stage = stage
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.records_in = Counter("kotel_stage_records_in", "Kafka records consumed", ["stage", "signal"],
                                  registry=r)
        self.records_out = Counter("kotel_stage_records_out", "Kafka records produced and acknowledged",
                                   ["stage", "signal"], registry=r)
        self.items_in = Counter("kotel_stage_items_in", "Items (spans, data points, log records) consumed",
                                ["stage", "signal"], registry=r)
        self.items_out = Counter("kotel_stage_items_out", "Items produced and acknowledged",
                                 ["stage", "signal"], registry=r)
        self.duplicates = Counter("kotel_stage_duplicate_items",
                                  "Items dropped as already seen in the window", ["stage", "signal"],
                                  registry=r)
        self.deadlettered = Counter("kotel_stage_deadlettered_records",
                                    "Records sent to the dead-letter topic, by reason",
                                    ["stage", "signal", "reason"], registry=r)
        self.table_keys = Gauge("kotel_stage_table_keys", "Estimated keys in a table's active partitions",
                                ["stage", "table"], registry=r)
        self.consumer_lag = Gauge("kotel_stage_consumer_lag",
                                  "Records between the last one processed and the partition's end",
                                  ["stage", "topic", "partition"], registry=r)
        self.gc_pauses = gc_pauses.PauseHistogram("kotel_stage_gc_pause_seconds", r, stage=stage)
        self._samplers: list[Callable[[], None]] = []

    def add_sampler(self, sampler: Callable[[], None]) -> None:
        """A callback that refreshes gauges; run before each scrape."""
        self._samplers.append(sampler)

    def sample(self) -> None:
        for sampler in self._samplers:
            sampler()

    def exposition(self) -> bytes:
        """The Prometheus text format, gauges refreshed first."""
        self.sample()
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """One sample's current value (0 when absent); for tests and benchmarks."""
        found = self.registry.get_sample_value(name, {"stage": self.stage, **labels})
        return found or 0.0
