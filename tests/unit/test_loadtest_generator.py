"""The load generator's shapes and identities: what the report's accounting relies on."""

from __future__ import annotations

from datetime import timedelta
from itertools import pairwise

import numpy as np
import pytest

from kotel.otlp import Signal, count_items, validate_request
from loadtest.accounting import to_seq
from loadtest.generator import Ledger, Shapes
from loadtest.generator.identity import SERIES_ATTRIBUTE, item_ids
from loadtest.generator.ledger import ERROR, HEALTH, LATE, SLOW, UNKNOWN
from loadtest.scenario import ScenarioError, TraceShape, Workload, parse_scenario

NOW = 1_800_000_000_000_000_000
TAG = 0x2A


def make(**changes: object) -> tuple[Shapes, Ledger]:
    workload = Workload(**changes)  # type: ignore[arg-type]
    ledger = Ledger([*workload.tenants, workload.unknown_tenant], run_tag=TAG)
    return Shapes(workload, ledger), ledger


def _spans(request: object) -> list[tuple[str, object]]:
    out = []
    for rs in request.resource_spans:  # type: ignore[attr-defined]
        attributes = rs.resource.attributes
        instance = next(kv.value.string_value for kv in attributes if kv.key == "service.instance.id")
        out += [(instance, span) for ss in rs.scope_spans for span in ss.spans]
    return out


def test_trace_requests_are_valid_otlp_and_their_ids_map_back_to_the_ledger() -> None:
    shapes, ledger = make()
    built = shapes.traces(NOW, 200)
    assert built is not None
    assert validate_request(Signal.TRACES, built.request, max_problems=3) == []
    assert count_items(built.request) == built.items >= 200
    ids = item_ids(Signal.TRACES, built.request, TAG, ledger.series)
    assert sorted(ids.tolist()) == np.flatnonzero(ledger["traces"].np("req") == built.request_id).tolist()
    assert item_ids(Signal.TRACES, built.request, TAG + 1, ledger.series).size == 0  # another run's spans


def test_traces_span_several_instances_arrive_shuffled_and_have_depth() -> None:
    shapes, _ = make(traces=TraceShape(late_share=0, health_share=0))
    spans = _spans(shapes.traces(NOW, 2000).request)  # type: ignore[union-attr]
    by_trace: dict[bytes, set[str]] = {}
    for instance, span in spans:
        by_trace.setdefault(span.trace_id, set()).add(instance)  # type: ignore[attr-defined]
    assert max(len(v) for v in by_trace.values()) >= 3
    seen: set[bytes] = set()
    child_first = 0
    for _, span in spans:
        if span.parent_span_id and span.parent_span_id not in seen:  # type: ignore[attr-defined]
            child_first += 1
        seen.add(span.span_id)  # type: ignore[attr-defined]
    assert child_first > 0
    roots = sum(1 for _, s in spans if not s.parent_span_id)  # type: ignore[attr-defined]
    assert len(spans) / roots > 2  # fan-out and depth, not one span a trace


def test_slow_error_and_health_traces_have_the_shape_their_flags_claim() -> None:
    shapes, ledger = make(traces=TraceShape(slow_share=0.2, error_share=0.2, health_share=0.1, late_share=0,
                                            slow_threshold_ms=500))
    spans = [s for _, s in _spans(shapes.traces(NOW, 4000).request)]  # type: ignore[union-attr]
    flags = ledger["traces"].np("flags")
    roots = {s.trace_id: s for s in spans if not s.parent_span_id}
    by_seq = {int.from_bytes(s.span_id, "big") & ((1 << 48) - 1): s for s in spans}
    counts = {"slow": 0, "error": 0, "health": 0}
    for seq, span in by_seq.items():
        root = roots[span.trace_id]
        duration_ms = (root.end_time_unix_nano - root.start_time_unix_nano) / 1e6
        if flags[seq] & HEALTH:
            counts["health"] += 1
            assert span.name == "GET /health"
            target = [kv.value.string_value for kv in span.attributes if kv.key == "http.target"]
            assert target == ["/health"]
        elif flags[seq] & SLOW:
            counts["slow"] += 1
            assert duration_ms >= 500 * 1.2
        else:
            assert duration_ms < 500
        assert span.start_time_unix_nano >= root.start_time_unix_nano
        assert span.end_time_unix_nano <= root.end_time_unix_nano
    failed = {s.trace_id for s in spans if s.status.code == 2}
    for seq, span in by_seq.items():
        assert bool(flags[seq] & ERROR) == (span.trace_id in failed)
        counts["error"] += bool(flags[seq] & ERROR)
    assert all(counts.values()), counts


def test_late_spans_are_held_back_until_late_by_has_passed() -> None:
    shapes, ledger = make(traces=TraceShape(late_share=0.3, late_by=timedelta(seconds=12)))
    first = shapes.traces(NOW, 500)
    assert first is not None
    late = ledger["traces"].np("flags") & LATE != 0
    assert late.any() and shapes.late_pending() == late.sum()
    assert not (ledger["traces"].np("req")[late] >= 0).any()  # not sent yet
    assert shapes.traces(NOW + 11 * 10**9, 0) is None
    released = shapes.traces(NOW + 12 * 10**9 + 10**8, 0)
    assert released is not None and released.items == late.sum()
    assert shapes.late_pending() == 0
    assert (ledger["traces"].np("req")[late] == released.request_id).all()


def test_metrics_cover_every_kind_and_each_point_has_a_unique_key() -> None:
    shapes, ledger = make(metrics={"series": 40})
    requests = [shapes.metrics(NOW + i * 1_000_000, 100) for i in range(5)]  # 500 points, 40 series
    for built in requests:
        assert validate_request(Signal.METRICS, built.request, max_problems=3) == []
        assert count_items(built.request) == 100
    kinds = set()
    series = set()
    for built in requests:
        for rm in built.request.resource_metrics:  # type: ignore[attr-defined]
            for metric in rm.scope_metrics[0].metrics:
                kind = metric.WhichOneof("data")
                kinds.add((kind, metric.sum.is_monotonic) if kind == "sum" else (kind, None))
                for point in getattr(metric, kind).data_points:
                    assert point.attributes[0].key == SERIES_ATTRIBUTE
                    series.add(point.attributes[0].value.int_value)
    assert kinds == {("gauge", None), ("sum", True), ("sum", False), ("histogram", None)}
    assert series == set(range(40))
    keys = ledger["metrics"].np("key")
    assert len(np.unique(keys)) == len(keys) == 500
    ids = np.concatenate([item_ids(Signal.METRICS, b.request, TAG, 40) for b in requests])
    assert sorted(to_seq(ledger["metrics"], "metrics", ids).tolist()) == list(range(500))


def test_logs_have_every_severity_trace_context_and_their_id() -> None:
    shapes, _ = make()
    shapes.traces(NOW, 200)
    built = shapes.logs(NOW, 400)
    assert validate_request(Signal.LOGS, built.request, max_problems=3) == []
    records = [r for rl in built.request.resource_logs for r in rl.scope_logs[0].log_records]  # type: ignore[attr-defined]
    assert {r.severity_text for r in records} == {"DEBUG", "INFO", "WARN", "ERROR"}
    assert 0 < sum(1 for r in records if r.trace_id) < len(records)
    assert sorted(item_ids(Signal.LOGS, built.request, TAG, 0).tolist()) == list(range(400))


def test_tenants_unknown_share_and_duplicate_share_follow_the_workload() -> None:
    shapes, ledger = make(unknown_share=0.2, duplicate_share=0.25, seed=3)
    for i in range(200):
        shapes.logs(NOW + i, 50)
    led = ledger["logs"]
    unknown = (led.np("flags") & UNKNOWN != 0).mean()
    assert 0.15 < unknown < 0.25
    assert (led.np("tenant")[led.np("flags") & UNKNOWN != 0] == len(ledger.tenants) - 1).all()
    assert 0.18 < (led.np("copies") == 2).mean() < 0.32
    assert ledger.summary()["logs"]["items"] == 10_000


def test_ledger_round_trips_through_its_files(tmp_path: object) -> None:
    shapes, ledger = make()
    built = shapes.traces(NOW, 100)
    assert built is not None
    ledger["traces"].settle(built.request_id, True, NOW + 5)
    ledger.save(tmp_path)  # type: ignore[arg-type]
    again = Ledger.load(tmp_path)  # type: ignore[arg-type]
    assert again.summary() == ledger.summary()
    assert (again["traces"].np("flags") == ledger["traces"].np("flags")).all()
    assert bytes(again.trace_flags) == bytes(ledger.trace_flags)


@pytest.mark.parametrize(("text", "message"), [
    ("name: x\nduration: 10\n", "<scenario>: duration: Value error, expected a duration like 200ms, 10s or "
                                 "1m30s, got the bare number 10 (add a unit)"),
    ("name: x\nworkload: {rates: {spans: 5}}\n", "<scenario>: workload.rates.spans: Extra inputs are not "
                                                 "permitted"),
    ("name: x\nduration: 10s\nfaults: [{kind: broker, at: 5s, duration: 10s}]\n",
     "<scenario>: (top level): Value error, fault at 5s lasting 10s ends after the run (10s)"),
    ("name: x\nfaults: [{kind: backend, backend: loki, at: 1s, duration: 1s}]\n",
     "<scenario>: (top level): Value error, fault stops backend 'loki', which pipeline.backends lacks"),
    ("- a\n", "<scenario>: expected a mapping at the top level"),
])
def test_bad_scenarios_say_where_and_why(text: str, message: str) -> None:
    with pytest.raises(ScenarioError) as err:
        parse_scenario(text)
    assert str(err.value) == message


def test_every_shipped_scenario_is_valid() -> None:
    from pathlib import Path

    from loadtest.scenario import load_scenario

    folder = Path(__file__).resolve().parents[2] / "loadtest" / "scenarios"
    names = {load_scenario(p).name for p in folder.glob("*.yaml")}
    assert names == {"smoke", "baseline", "burst", "soak", "outage", "latency"}


def test_the_error_span_of_a_trace_is_never_held_back() -> None:
    """A trace decided without its ERROR span is rightly dropped; the run checks every one is kept."""
    shapes, _ = make(traces=TraceShape(late_share=0.9, error_share=1.0, health_share=0,
                                       late_by=timedelta(seconds=1)))
    on_time = shapes.traces(NOW, 400)
    late = shapes.traces(NOW + 2 * 10**9, 0)
    assert on_time is not None and late is not None and late.items > 0

    def errors(built: object) -> int:
        request = built.request  # type: ignore[attr-defined]
        return sum(s.status.code == 2 for rs in request.resource_spans for ss in rs.scope_spans
                   for s in ss.spans)
    assert errors(late) == 0 and errors(on_time) > 0


def _schedules(arrivals: str, rate: float = 50.0, seconds: float = 60.0) -> dict[Signal, list[int]]:
    from loadtest.generator import Driver

    shapes, ledger = make()
    driver = Driver(shapes, None, ledger, items_per_request=10, max_in_flight=8,  # type: ignore[arg-type]
                    arrivals=arrivals)  # type: ignore[arg-type]
    return {s: list(driver.schedule(s, rate, seconds, NOW)) for s in Signal}


def test_even_arrivals_keep_the_rate_and_offset_the_signals_from_each_other() -> None:
    """Three signals due at the same instant queue behind each other in every stage that serves them in
    one event loop: independent clients are not in lockstep, so the default spreads them."""
    due = _schedules("even")
    interval = 200_000_000  # 10 items per request at 50 items/s
    for times in due.values():
        assert len(times) == 300
        assert {b - a for a, b in pairwise(times)} <= {interval - 1, interval, interval + 1}
    firsts = sorted(times[0] - NOW for times in due.values())
    assert firsts[0] == 0 and min(b - a for a, b in pairwise(firsts)) >= interval // 3 - 1


def test_aligned_arrivals_send_every_signal_at_once() -> None:
    due = _schedules("aligned")
    assert due[Signal.TRACES] == due[Signal.METRICS] == due[Signal.LOGS]
    assert len(due[Signal.LOGS]) == 300


def test_poisson_arrivals_keep_the_mean_rate_with_exponential_gaps() -> None:
    due = _schedules("poisson", seconds=600.0)
    gaps = np.diff(np.array(due[Signal.METRICS], dtype=np.int64)) / 1e9
    assert 2800 < len(due[Signal.METRICS]) < 3200  # 3000 expected, sd ~55
    assert 0.18 < gaps.mean() < 0.22 and 0.6 < np.median(gaps) / gaps.mean() < 0.8  # ln 2
    assert gaps.std() / gaps.mean() > 0.85  # an exponential's coefficient of variation is 1, a clock's 0
    assert due[Signal.METRICS] != due[Signal.LOGS] and due[Signal.METRICS] == _schedules(
        "poisson", seconds=600.0)[Signal.METRICS]  # independent per signal, repeatable per seed
