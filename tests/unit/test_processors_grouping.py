"""groupbyattrs on real OTLP requests, and the memory limiter with an injected RSS reader and clock."""

from __future__ import annotations

from datetime import timedelta

import psutil
import pytest
from opentelemetry.proto.metrics.v1 import metrics_pb2

from agents.contracts import Overloaded
from agents.processors.groupbyattrs import GroupByAttrsProcessor
from agents.processors.memory_limiter import MIB, MemoryLimiter, total_memory
from agents.telemetry import AgentMetrics
from kotel.otlp import Signal, count_items
from kotel.topology.processors import GroupByAttrsConfig, MemoryLimiterConfig
from tests.unit.otlp_builders import as_dict, build, counter, gauge, items, log, span

T, M, L = Signal.TRACES, Signal.METRICS, Signal.LOGS
INSTANCE = "service.instance.id"


def _group(*keys: str) -> GroupByAttrsProcessor:
    return GroupByAttrsProcessor(GroupByAttrsConfig(keys=list(keys)), AgentMetrics(), "groupbyattrs")


def _layout(signal: Signal, request) -> list[tuple[dict, list[tuple[str, list[str]]]]]:
    """(resource attributes, [(scope name, [item names or bodies])]) per resource entry."""
    def name(item) -> str:
        return item.body.string_value if signal is Signal.LOGS else item.name

    return [(as_dict(e.resource.attributes),
             [(s.scope.name, [name(i) for i in getattr(s, signal.item_field)])
              for s in getattr(e, signal.scope_field)])
            for e in getattr(request, signal.resource_field)]  # fmt: skip


def test_the_usual_request_is_returned_untouched() -> None:
    request = build(T, ({INSTANCE: "i-1", "service.name": "a"}, [[span("x", k=1), span("y")], [span("z")]]))
    before = request.SerializeToString()
    assert _group(INSTANCE).process(T, request) is request
    assert request.SerializeToString() == before


def test_same_resource_entries_are_compacted() -> None:
    request = build(T, ({INSTANCE: "i-1"}, [[span("a")], [span("b")]]),
                    ({"other": "r"}, [[span("c")]]),
                    ({INSTANCE: "i-1"}, [[span("d")], [span("e")]]))  # fmt: skip
    out = _group(INSTANCE).process(T, request)
    assert _layout(T, out) == [
        ({INSTANCE: "i-1"}, [("scope-0", ["a", "d"]), ("scope-1", ["b", "e"])]),
        ({"other": "r"}, [("scope-0", ["c"])]),
    ]
    assert _layout(T, _group().process(T, request)) == _layout(T, out)  # no keys: compaction alone


def test_record_attributes_move_to_the_resource() -> None:
    request = build(L, ({"service.name": "fluentbit", "host": "n1"}, [[
        log("a1", **{INSTANCE: "a", "msg": 1}), log("b1", **{INSTANCE: "b"}), log("plain"),
        log("a2", **{INSTANCE: "a"}),
    ]]))  # fmt: skip
    out = _group(INSTANCE).process(L, request)
    base = {"service.name": "fluentbit", "host": "n1"}
    assert _layout(L, out) == [
        ({**base, INSTANCE: "a"}, [("scope-0", ["a1", "a2"])]),
        ({**base, INSTANCE: "b"}, [("scope-0", ["b1"])]),
        (base, [("scope-0", ["plain"])]),
    ]
    assert [as_dict(r.attributes) for r in items(L, out)] == [{"msg": 1}, {}, {}, {}]


def test_moved_value_overrides_and_equal_values_merge_with_the_original() -> None:
    spans = [span("same", **{INSTANCE: "a"}), span("other", **{INSTANCE: "z"}), span("none")]
    request = build(T, ({INSTANCE: "a", "x": 1}, [spans]))
    out = _group(INSTANCE, "absent.key").process(T, request)
    assert _layout(T, out) == [
        ({INSTANCE: "a", "x": 1}, [("scope-0", ["same", "none"])]),
        ({INSTANCE: "z", "x": 1}, [("scope-0", ["other"])]),
    ]
    assert count_items(out) == 3


def test_metric_points_move_with_a_copy_of_their_metric() -> None:
    request = build(M, ({"service.name": "prom"}, [[
        counter("bytes", {"pod": "p1", "dir": "in"}, {"pod": "p2"}, {"pod": "p1", "dir": "out"}),
        gauge("up", {}),
    ]]), ({"service.name": "prom"}, [[gauge("up", {"other": 1})]]))  # fmt: skip
    out = _group("pod").process(M, request)
    layout = []
    for entry in out.resource_metrics:
        metrics = entry.scope_metrics[0].metrics
        layout.append((as_dict(entry.resource.attributes),
                       [(m.name, [as_dict(p.attributes) for p in
                                  (m.sum.data_points if m.HasField("sum") else m.gauge.data_points)])
                        for m in metrics]))  # fmt: skip
    assert layout == [
        ({"service.name": "prom", "pod": "p1"}, [("bytes", [{"dir": "in"}, {"dir": "out"}])]),
        ({"service.name": "prom", "pod": "p2"}, [("bytes", [{}])]),
        ({"service.name": "prom"}, [("up", [{}, {"other": 1}])]),  # two "up" metrics merged into one
    ]
    moved = out.resource_metrics[0].scope_metrics[0].metrics[0]
    assert (moved.unit, moved.description, moved.sum.is_monotonic, moved.sum.aggregation_temporality) == (
        "By", "bytes sent", True, metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE)
    assert [p.as_int for p in moved.sum.data_points] == [10, 12]
    assert count_items(out) == 5


def test_different_metric_types_with_one_name_stay_apart() -> None:
    summary = metrics_pb2.Metric(name="m", unit="1")
    summary.summary.data_points.add(count=1, sum=2.0)
    request = build(M, ({}, [[gauge("m", {}), summary]]), ({}, [[gauge("m", {"a": 1}), summary]]))
    out = _group().process(M, request)
    metrics = out.resource_metrics[0].scope_metrics[0].metrics
    shapes = [(m.WhichOneof("data"), len(m.gauge.data_points) + len(m.summary.data_points)) for m in metrics]
    assert shapes == [("gauge", 2), ("summary", 2)]


# --- memory limiter ------------------------------------------------------------------------------------


class FakeProcess:
    """An RSS that tests set, a collection hook that may release memory, and a clock."""

    def __init__(self, rss_mib: float) -> None:
        self.rss = int(rss_mib * MIB)
        self.after_gc: int | None = None
        self.collections = 0
        self.now = 0.0

    def read(self) -> int:
        return self.rss

    def collect(self) -> None:
        self.collections += 1
        if self.after_gc is not None:
            self.rss = self.after_gc


def _limiter(fake: FakeProcess, **config: object) -> MemoryLimiter:
    cfg = MemoryLimiterConfig(check_interval=timedelta(milliseconds=500), **config)
    return MemoryLimiter(cfg, fake.read, collect=fake.collect, clock=lambda: fake.now,
                         total_memory_reader=lambda: 1000 * MIB)  # fmt: skip


def test_limits_from_mib_and_the_default_spike() -> None:
    fake = FakeProcess(10)
    limiter = _limiter(fake, limit_mib=100, spike_limit_mib=30)
    assert (limiter.hard_limit, limiter.soft_limit) == (100 * MIB, 70 * MIB)
    assert _limiter(fake, limit_mib=100).soft_limit == 80 * MIB  # spike defaults to 20% of the limit
    by_share = _limiter(fake, limit_percentage=50, spike_limit_percentage=10)
    assert (by_share.hard_limit, by_share.soft_limit) == (500 * MIB, 400 * MIB)
    assert _limiter(fake, limit_percentage=50).soft_limit == 400 * MIB


def test_refuses_above_the_soft_limit_and_recovers() -> None:
    fake = FakeProcess(70)
    limiter = _limiter(fake, limit_mib=100, spike_limit_mib=20)
    request = build(T, ({}, [[span()]]))
    assert limiter.check() is False and not limiter.should_refuse()
    assert limiter.process(T, request) is request
    fake.rss = 85 * MIB
    assert limiter.check() is True and limiter.should_refuse()
    assert fake.collections == 1  # above the soft limit: one collection first, as the Collector
    with pytest.raises(Overloaded) as err:
        limiter.process(T, request)
    assert str(err.value) == "memory_limiter: memory usage 85 MiB is above the soft limit 80 MiB; retry later"
    assert (err.value.retry_after, err.value.reason) == (0.5, "memory_limit")
    fake.rss = 60 * MIB
    assert limiter.check() is False
    assert limiter.process(T, request) is request


def test_collection_that_frees_enough_avoids_refusing() -> None:
    fake = FakeProcess(95)
    fake.after_gc = 50 * MIB
    limiter = _limiter(fake, limit_mib=100, spike_limit_mib=20)
    assert limiter.check() is False
    assert (fake.collections, limiter.usage) == (1, 50 * MIB)


def test_collections_are_spaced_above_the_soft_limit_but_not_above_the_hard_one() -> None:
    fake = FakeProcess(90)
    limiter = _limiter(fake, limit_mib=100, spike_limit_mib=20)
    for _ in range(3):
        limiter.check()
    assert fake.collections == 1  # soft: at most every 10 s
    fake.now = 10.5
    limiter.check()
    assert fake.collections == 2
    fake.rss = 120 * MIB
    for _ in range(3):
        limiter.check()
    assert fake.collections == 5  # hard: every check


def test_percentage_spike_must_be_below_the_limit() -> None:
    with pytest.raises(ValueError) as err:
        _limiter(FakeProcess(1), limit_percentage=20, spike_limit_percentage=20)
    assert str(err.value) == (
        "memory_limiter: spike_limit_percentage (20) must be smaller than limit_percentage (20)")


def test_total_memory_is_at_most_the_physical_memory() -> None:
    assert 0 < total_memory() <= psutil.virtual_memory().total
