"""The Collector's memory_limiter as an admission check: refuse new data while memory is above the soft limit.

The caller runs ``check()`` every ``check_interval``; ``should_refuse()`` is then a flag read, cheap enough
for every request, and ``process()`` (so the limiter can head a pipeline, as in the Collector) raises the
retryable ``Overloaded`` while refusing. The hard limit is ``limit_mib`` or ``limit_percentage`` of the
total memory (the cgroup limit when the agent runs in a smaller container); the soft limit is the hard limit
minus the spike limit, which defaults to 20% of the hard limit.

Usage is the process RSS: the Collector reads Go's heap, and Python has no heap figure that includes what
protobuf (upb arenas) and librdkafka allocate. As in the Collector, a check above the soft limit forces a
garbage collection (at most every ``min_gc_soft`` seconds, 10 by default; above the hard limit every
``min_gc_hard`` seconds, 0: each check) and reads the usage again before deciding.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from pathlib import Path

import psutil
from google.protobuf.message import Message

from agents.contracts import Overloaded
from kotel.otlp import Signal
from kotel.topology.processors import MemoryLimiterConfig

MIB = 1 << 20
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def total_memory() -> int:
    """Physical memory, or the cgroup's memory limit when that is smaller ("max" means none)."""
    total = psutil.virtual_memory().total
    for path in _CGROUP_LIMITS:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
        break
    return total


def process_rss() -> int:
    return psutil.Process().memory_info().rss


class MemoryLimiter:
    def __init__(
        self,
        config: MemoryLimiterConfig,
        rss_reader: Callable[[], int] = process_rss,
        *,
        name: str = "memory_limiter",
        total_memory_reader: Callable[[], int] = total_memory,
        collect: Callable[[], object] = gc.collect,
        clock: Callable[[], float] = time.monotonic,
        min_gc_soft: float = 10.0,
        min_gc_hard: float = 0.0,
    ) -> None:
        self.name = name
        self._rss = rss_reader
        self._collect = collect
        self._clock = clock
        self._min_gc_soft = min_gc_soft
        self._min_gc_hard = min_gc_hard
        self.interval = config.check_interval.total_seconds()
        if config.limit_mib:
            limit, spike = config.limit_mib * MIB, config.spike_limit_mib * MIB
        else:
            total = total_memory_reader()
            limit = total * config.limit_percentage // 100
            spike = total * config.spike_limit_percentage // 100
            if spike >= limit:
                raise ValueError(
                    f"{name}: spike_limit_percentage ({config.spike_limit_percentage}) must be smaller than "
                    f"limit_percentage ({config.limit_percentage})"
                )
        self.hard_limit = limit
        self.soft_limit = limit - (spike or limit // 5)
        self.usage = 0
        self._refusing = False
        self._last_gc = -math.inf

    def check(self) -> bool:
        """Read the usage (collecting garbage first when above the soft limit); True while refusing."""
        usage = self._rss()
        if usage > self.soft_limit:
            gap = self._min_gc_hard if usage > self.hard_limit else self._min_gc_soft
            now = self._clock()
            if now - self._last_gc >= gap:
                self._collect()
                self._last_gc = now
                usage = self._rss()
        self.usage = usage
        self._refusing = usage > self.soft_limit
        return self._refusing

    def should_refuse(self) -> bool:
        return self._refusing

    def process(self, signal: Signal, request: Message) -> Message | None:
        if self._refusing:
            raise Overloaded(
                f"{self.name}: memory usage {self.usage // MIB} MiB is above the soft limit "
                f"{self.soft_limit // MIB} MiB; retry later",
                retry_after=self.interval,
                reason="memory_limit",
            )
        return request
