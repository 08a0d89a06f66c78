"""Garbage-collector pauses reach the metrics of every kind of kotel process."""

from __future__ import annotations

import gc
import weakref

from streams.telemetry import WorkerMetrics


def test_a_full_collection_is_timed_for_each_worker() -> None:
    first, second = WorkerMetrics("dedup"), WorkerMetrics("tail")
    gc.collect()
    for metrics in (first, second):
        assert metrics.value("kotel_stage_gc_pause_seconds_count", generation="2") >= 1
        assert metrics.value("kotel_stage_gc_pause_seconds_sum", generation="2") > 0


def test_the_agent_and_a_sink_export_their_pauses_too() -> None:
    from agents.telemetry import AgentMetrics
    from streams.sinks.runtime import SinkMetrics

    agent, sink = AgentMetrics(), SinkMetrics()
    gc.collect()
    for metrics, name in ((agent, "kotel_agent_gc_pause_seconds"), (sink, "kotel_sink_gc_pause_seconds")):
        assert (metrics.registry.get_sample_value(f"{name}_count", {"generation": "2"}) or 0) >= 1


def test_a_dropped_worker_is_no_longer_told() -> None:
    from kotel import gc_pauses

    kept, dropped = WorkerMetrics("route"), WorkerMetrics("tail")
    gc.collect()
    before = len(gc_pauses._listeners)
    del dropped
    gc.collect()
    assert len(gc_pauses._listeners) == before - 1
    assert kept.gc_pauses in gc_pauses._listeners


def test_settle_freezes_what_lives_and_collects_what_was_left_since() -> None:
    from kotel import gc_pauses

    class Node:
        def __init__(self) -> None:
            self.me = self  # a reference cycle: only the collector frees it

    metrics = WorkerMetrics("dedup")
    gc_pauses.settle()
    assert metrics.value("kotel_stage_gc_pause_seconds_count", generation="settle") == 1
    leftover = weakref.ref(Node())  # made, then dropped, after the freeze: collected as usual
    gc.collect()
    assert leftover() is None
    cycle = Node()
    kept = weakref.ref(cycle)
    gc_pauses.settle()  # it lives: frozen now
    del cycle
    gc.collect()
    assert kept() is not None, "frozen objects are out of the collector's sight"
    gc_pauses.settle()  # the next settle thaws and collects it
    assert kept() is None
    gc.unfreeze()
