"""The backend read-back's pure parts: expected sets, answers of Jaeger, VictoriaLogs and Prometheus mapped to
item identities, the comparison, the verdict and the report table (answers shaped like the real APIs')."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pytest
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric

from loadtest.accounting import verdict
from loadtest.collect import Observation
from loadtest.generator import Ledger, Shapes
from loadtest.generator.identity import ID_ATTRIBUTE, SERIES_ATTRIBUTE, metric_key, span_id
from loadtest.readback import (
    LOG_ID_FIELD,
    PROMETHEUS_NAMES,
    SERIES_LABEL,
    compare,
    expected_ids,
    log_ids,
    merge,
    metric_keys,
    read_back,
    rfc3339,
    span_seqs,
    time_slices,
)
from loadtest.report import FATES as REPORTED_FATES
from loadtest.report import markdown
from loadtest.scenario import MetricShape, Scenario, Workload
from streams.sinks.prom_translate_names import Kind, label_name, metric_name

NOW = 1_800_000_000_000_000_000
S = 10**9


def _clean(n: int) -> dict[str, object]:
    return {"expected": n, "found": n, "missing": 0, "duplicates": 0, "unexpected": 0, "examples": []}


def test_expected_is_what_the_archive_holds_for_the_tenants_routed_to_the_backend() -> None:
    # tenants 0 and 1 are routed; 2 is the unknown tenant; -1 an archive folder of no ledger tenant
    sink = Observation("sink", "logs", np.array([5, 1, 1, 7, 9, 3]), np.zeros(6, np.int64),
                       np.array([0, 1, 1, 2, -1, 0]))
    assert expected_ids(sink, 2).tolist() == [1, 3, 5]
    assert expected_ids(sink, 2, tenant=1).tolist() == [1]
    assert expected_ids(Observation.empty("sink", "logs"), 2).tolist() == []


def test_compare_counts_missing_extra_copies_and_unexpected_items_with_examples() -> None:
    got = compare(np.array([1, 2, 3, 4]), np.array([2, 2, 2, 3, 4, 9]), lambda i: f"log {i}")
    assert got == {"expected": 4, "found": 3, "missing": 1, "duplicates": 2, "unexpected": 1,
                   "examples": ["missing log 1", "log 2 3 times", "unexpected log 9"]}
    assert compare(np.array([4, 3, 3]), np.array([3, 4])) == _clean(2)


def test_per_tenant_comparisons_add_up() -> None:
    a = compare(np.array([1, 2]), np.array([1]), lambda i: f"log {i} (tenant-a)")
    b = compare(np.array([3]), np.array([3, 3]), lambda i: f"log {i} (tenant-b)")
    assert merge([a, b]) == {"expected": 3, "found": 2, "missing": 1, "duplicates": 1, "unexpected": 0,
                             "examples": ["missing log 2 (tenant-a)", "log 3 (tenant-b) 2 times"]}


def test_time_slices_cover_the_window_in_whole_seconds_sized_by_the_budget() -> None:
    assert time_slices(NOW + S // 2, NOW + 10 * S + 1, items=100, budget=1000) == [(NOW, NOW + 11 * S)]
    slices = time_slices(NOW + S // 2, NOW + 10 * S + 1, items=2500, budget=1000)
    assert slices == [(NOW, NOW + 4 * S), (NOW + 4 * S, NOW + 8 * S), (NOW + 8 * S, NOW + 11 * S)]
    assert time_slices(NOW, NOW, items=5, budget=1) == [(NOW, NOW + S)]
    assert rfc3339(NOW + 5) == "2027-01-15T08:00:00.000000005Z"


def _span(trace: str, run_tag: int, seq: int) -> dict[str, str]:
    return {"traceId": trace, "spanId": span_id(run_tag, seq).hex(), "name": "GET /api/cart",
            "startTimeUnixNano": str(NOW), "endTimeUnixNano": str(NOW + 1000)}


def test_jaeger_spans_map_to_this_runs_sequence_numbers_once_per_trace_across_slices() -> None:
    t1, t2 = "0f" * 16, "a1" * 16
    resource = {"attributes": [{"key": "service.name", "value": {"stringValue": "checkout"}}]}
    answer = {"result": {"resourceSpans": [
        {"resource": resource, "scopeSpans": [{"scope": {}, "spans": [_span(t1, 7, 3), _span(t1, 8, 3)]}]},
        # a span stored twice (Jaeger appends every copy; raw_traces keeps them)
        {"resource": resource, "scopeSpans": [{"scope": {}, "spans": [_span(t1, 7, 4), _span(t1, 7, 4)]}]},
    ]}}
    seen: set[str] = set()
    assert span_seqs(answer, 7, seen) == [3, 4, 4]
    assert seen == {t1}
    later = {"result": {"resourceSpans": [{"resource": resource, "scopeSpans": [{"spans": [
        _span(t1, 7, 3), _span(t2, 7, (1 << 48) - 1)]}]}]}}
    assert span_seqs(later, 7, seen) == [(1 << 48) - 1]
    assert span_seqs({"error": {"httpCode": 404, "message": "No traces found"}}, 7, seen) == []


def test_victorialogs_lines_give_the_id_field_of_each_entry() -> None:
    body = (b'{"loadtest_id":"42"}\n{"loadtest_id":"43"}\n\n{"loadtest_id":"43"}\n'
            b'{"_msg":"not ours"}\n{"loadtest_id":""}\n')
    assert log_ids(body).tolist() == [42, 43, 43]
    assert log_ids(b"").tolist() == []


def test_prometheus_samples_map_to_metric_keys_by_series_label_and_time() -> None:
    result = [
        {"metric": {"__name__": "loadtest_queue_depth", "job": "frontend", "loadtest_series": "3"},
         "values": [[1800000000.123, "1.5"], [1800000000.124, "2"]]},
        {"metric": {"__name__": "loadtest_requests_total", "loadtest_series": "0"},
         "values": [[1800000001, "7"]]},
        {"metric": {"__name__": "loadtest_requests_total", "job": "other"}, "values": [[1800000001, "7"]]},
    ]
    assert metric_keys(result, 20).tolist() == [
        metric_key(1800000000123, 3, 20), metric_key(1800000000124, 3, 20), metric_key(1800000001000, 0, 20)]


def test_names_are_what_the_sinks_translation_makes_of_the_generators_items() -> None:
    workload = Workload(metrics=MetricShape(series=8))
    ledger = Ledger([*workload.tenants, workload.unknown_tenant], run_tag=1)
    request = Shapes(workload, ledger).metrics(NOW, 8)
    metrics: dict[str, Metric] = {m.name: m for rm in request.request.resource_metrics
                                  for sm in rm.scope_metrics for m in sm.metrics}
    names = set()
    for m in metrics.values():
        kind = {"gauge": Kind.GAUGE, "histogram": Kind.HISTOGRAM}.get(m.WhichOneof("data"))
        if kind is None:
            kind = Kind.COUNTER if m.sum.is_monotonic else Kind.GAUGE
        names.add(metric_name(m.name, m.unit, kind) + ("_count" if kind is Kind.HISTOGRAM else ""))
    assert len(metrics) == 4 and names == set(PROMETHEUS_NAMES)
    assert label_name(ID_ATTRIBUTE) == LOG_ID_FIELD and label_name(SERIES_ATTRIBUTE) == SERIES_LABEL


FATES = (*REPORTED_FATES, "filter_leaks")


def _backends_result() -> dict[str, dict[str, object]]:
    """Three signals whose archive accounting is clean, with one backend each."""
    tempo = compare(np.array([1, 2, 3]), np.array([2, 3, 3]), lambda i: f"span {i}")
    tempo["note"] = "Jaeger keeps 2"
    backends = {"traces": {"tempo": tempo}, "metrics": {"prometheus": _clean(5)},
                "logs": {"loki": {"error": "ReadbackError: loki: out of time"}}}
    return {signal: {"fates": dict.fromkeys(FATES, 0), "sampling": {}, "backends": b, "rates": {},
                     "latency_ms": {}} for signal, b in backends.items()}


def test_the_verdict_fails_on_missing_duplicated_unexpected_or_unread_items() -> None:
    assert verdict(_backends_result(), 0, 0, True) == [
        "traces at tempo: 1 missing, 1 duplicates of 3 expected (e.g. missing span 1; span 3 2 times) "
        "(Jaeger keeps 2)",
        "logs at loki: read-back failed: ReadbackError: loki: out of time",
    ]
    clean = {"logs": {**_backends_result()["logs"], "backends": {"loki": _clean(3)}}}
    assert verdict(clean, 0, 0, True) == []


def test_the_summary_has_a_backends_table() -> None:
    signals = _backends_result()
    result = {"scenario": Scenario(name="unit").model_dump(mode="json"), "started": "now", "passed": False,
              "problems": [], "duration_s": 1.0, "tail_sampling": "off", "processes": {}, "signals": signals,
              "machine": {"cpus": 2, "memory_gib": 1.0, "python": "3.11", "load_average": 0.5}}
    text = markdown(result)
    assert "| traces | tempo | 3 | 2 | 1 | 1 | 0 | Jaeger keeps 2 |" in text
    assert "| metrics | prometheus | 5 | 5 | 0 | 0 | 0 |  |" in text
    assert "| logs | loki | - | - | - | - | - | read-back failed: ReadbackError: loki: out of time |" in text
    del signals["logs"]["backends"], signals["traces"]["backends"], signals["metrics"]["backends"]
    assert "## Backends" not in markdown(result)


# -- read_back against a stand-in HTTP server: what an error answer becomes ------------------------------

def _ledger_with_logs() -> tuple[Ledger, dict[str, dict[str, Observation]]]:
    workload = Workload(tenants=["tenant-a"])
    ledger = Ledger(["tenant-a", workload.unknown_tenant], run_tag=3)
    Shapes(workload, ledger).logs(NOW, 5)
    stages = {"logs": {"sink": Observation("sink", "logs", np.arange(5), np.zeros(5, np.int64),
                                           np.zeros(5, np.int64))}}
    return ledger, stages


@pytest.fixture
def answering() -> Iterator[tuple[str, list[str]]]:
    """127.0.0.1 server answering 500 ``boom`` to everything; yields its URL and the paths it was asked."""
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            asked.append(self.path.split("?")[0])
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"boom")

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_a_backend_answering_an_error_is_a_problem_line_not_a_crash(answering: tuple[str, list[str]]) -> None:
    url, asked = answering
    ledger, stages = _ledger_with_logs()
    got = read_back({"loki": SimpleNamespace(url=url)}, stages, ledger, routed_tenants=1)
    error = "ReadbackError: VictoriaLogs force_flush answered 500: b'boom'"
    assert got == {"logs": {"loki": {"error": error}}}
    assert asked == ["/internal/force_flush"]


def test_a_read_back_out_of_time_or_of_an_unoffered_signal() -> None:
    ledger, stages = _ledger_with_logs()
    assert read_back({"loki": SimpleNamespace(url="http://127.0.0.1:9")}, stages, ledger, 1, timeout_s=0) == {
        "logs": {"loki": {"error": "ReadbackError: loki: out of time"}}}
    assert read_back({"tempo": SimpleNamespace()}, stages, ledger, 1) == {}
