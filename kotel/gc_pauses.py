"""Python's garbage-collector pauses: kept short, and measured as a process's own telemetry.

A full collection walks every tracked object of the heap while holding the GIL. A stage worker's heap is
mostly what start-up made and keeps for its whole life (modules, protobuf descriptors, Faust, aiokafka,
numpy): about 100k objects whose full collection took ~100 ms here, every few seconds under load (the
tail worker: 45 of its 46 full collections over 100 ms while deciding a backlog, each an event-loop
stall). `settle` moves what start-up made out of the collector's sight (`gc.freeze`), so later full
collections walk only what was made since. Stage workers settle (streams.cli, streams.app); the agent
and the sinks do not: their latency runs with and without it differed less than the host's noise
(loadtest/results/scenarios.md). One `gc.callbacks` hook per process times each collection and hands
the pause to every registered listener (each process's metrics, several in one test process): every
kotel process exports its pauses (`PauseHistogram`), so a latency spike can be checked against them.
"""

from __future__ import annotations

import gc
import time
import weakref
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Histogram

__all__ = ["GcListener", "PauseHistogram", "settle", "watch"]

PAUSE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class GcListener(Protocol):
    def observe_gc(self, generation: str, seconds: float) -> None:
        """``generation`` is "0", "1", "2", or "settle" for `settle`'s own collection."""


_listeners: weakref.WeakSet[Any] = weakref.WeakSet()
_began = 0.0
_settling = False


def _on_gc(phase: str, info: dict[str, int]) -> None:
    global _began
    if phase == "start":
        _began = time.perf_counter()
        return
    pause = time.perf_counter() - _began
    generation = "settle" if _settling else str(info.get("generation", -1))
    for listener in list(_listeners):
        listener.observe_gc(generation, pause)


def watch(listener: GcListener) -> None:
    """Report each collection's pause to ``listener`` for as long as it is alive."""
    if _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)
    _listeners.add(listener)


def settle() -> None:
    """Once start-up is done: collect everything, frozen or not, then freeze what is left.

    Frozen objects are never collected, so the thaw first: cycles left behind since an earlier call go
    now. Objects made later are collected as usual. One full pause per call."""
    global _settling
    gc.unfreeze()
    _settling = True
    try:
        gc.collect()
    finally:
        _settling = False
    gc.freeze()


class PauseHistogram:
    """``<name>{<labels>, generation}`` in ``registry``: the pauses of this process, observed for as long
    as this object lives (the metrics object that holds it)."""

    def __init__(self, name: str, registry: CollectorRegistry, **labels: str) -> None:
        self.histogram = Histogram(name, "Pauses of Python's garbage collector (the event loop stands "
                                   "still meanwhile), by generation ('settle': once, after start-up)",
                                   [*labels, "generation"], registry=registry, buckets=PAUSE_BUCKETS)
        self.values = list(labels.values())
        watch(self)

    def observe_gc(self, generation: str, seconds: float) -> None:
        self.histogram.labels(*self.values, generation).observe(seconds)
