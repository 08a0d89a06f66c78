"""Accounting math and report writing over a ledger and hand-made stage observations (no broker)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loadtest.accounting import Options, account, percentiles, verdict
from loadtest.collect import Observation
from loadtest.generator import Ledger, Shapes
from loadtest.generator.ledger import ERROR, HEALTH, LATE, SLOW
from loadtest.report import markdown, write_results
from loadtest.scenario import Scenario, TraceShape, Workload

NOW = 1_800_000_000_000_000_000
MS = 1_000_000


def _ledger(signal: str = "logs", requests: int = 4, **shape: Any) -> Ledger:
    workload = Workload(traces=TraceShape(late_share=0, **shape), duplicate_share=0)
    ledger = Ledger([*workload.tenants, workload.unknown_tenant], run_tag=7)
    shapes = Shapes(workload, ledger)
    build = {"logs": shapes.logs, "traces": shapes.traces, "metrics": shapes.metrics}[signal]
    for i in range(requests):
        built = build(NOW + i * 1000 * MS, 50)
        ledger[signal].settle(built.request_id, True, NOW + i * 1000 * MS + 3 * MS)
    return ledger


def _ids(ledger: Ledger, signal: str, seqs: np.ndarray) -> np.ndarray:
    return ledger[signal].np("key")[seqs] if signal == "metrics" else seqs.astype(np.int64)


def _stages(ledger: Ledger, signal: str, keep: np.ndarray,
            delay_ms: dict[str, int]) -> dict[str, Observation]:
    """Each stage holds the kept items, ``delay_ms`` after the previous stage; the right tenant each."""
    led = ledger[signal]
    seqs = np.flatnonzero(keep)
    ts = led.np("scheduled_ns")[led.np("req")[seqs]].astype(np.int64)
    tenants = led.np("tenant")[seqs].astype(np.int64)
    out = {}
    for stage in ("agent", "dedup", "routing", "sink"):
        ts = ts + delay_ms[stage] * MS
        out[stage] = Observation(stage, signal, _ids(ledger, signal, seqs), ts.copy(), tenants.copy())
    out["deadletter"] = Observation.empty("deadletter", signal)
    return out


DELAYS = {"agent": 10, "dedup": 20, "routing": 5, "sink": 100}


@pytest.mark.parametrize("signal", ["logs", "metrics"])
def test_everything_delivered_once_is_clean_and_latencies_add_up(signal: str) -> None:
    ledger = _ledger(signal)
    n = ledger[signal].items
    res = account(ledger, signal, _stages(ledger, signal, np.ones(n, bool), DELAYS), Options(start_ns=NOW))
    f = res["fates"]
    assert (f["offered"], f["acked"], f["delivered"], f["lost"], f["sink_duplicates"], f["misrouted"]) == \
        (200, 200, 200, 0, 0, 0)
    lat = res["latency_ms"]
    steps = (lat["agent"]["p50"], lat["dedup"]["p95"], lat["routing"]["p99"], lat["sink"]["p50"])
    assert steps == (10, 20, 5, 100)
    assert lat["end_to_end"]["p95"] == 135
    assert lat["client_ack"]["p50"] == 3
    assert res["timeline"]["offered"][:4] == [50.0, 50.0, 50.0, 50.0]
    assert verdict({signal: res}, 0, 0, True) == []


def test_a_missing_item_is_lost_a_dead_lettered_one_is_not_and_a_refused_one_is_apart() -> None:
    ledger = _ledger()
    led = ledger["logs"]
    keep = np.ones(led.items, bool)
    keep[[3, 4, 60]] = False
    stages = _stages(ledger, "logs", keep, DELAYS)
    stages["deadletter"] = Observation("deadletter", "logs", np.array([4]), np.array([NOW]))
    led.status[1] = 2  # the second request (items 50..99) was refused: not covered by the promise
    res = account(ledger, "logs", stages, Options(start_ns=NOW))
    f = res["fates"]
    assert (f["lost"], f["dead_lettered"], f["refused"], f["refused_but_delivered"]) == (1, 1, 50, 49)
    assert res["lost_examples"] == [3]
    assert verdict({"logs": res}, 0, 0, True) == ["logs: 1 items lost (e.g. seq [3])"]


def test_duplicates_at_the_sink_misrouting_and_dedup_are_counted() -> None:
    ledger = _ledger()
    n = ledger["logs"].items
    stages = _stages(ledger, "logs", np.ones(n, bool), DELAYS)
    sink, raw, routed = stages["sink"], stages["agent"], stages["routing"]
    stages["sink"] = Observation("sink", "logs", np.concatenate([sink.ids, [5, 5]]),
                                 np.concatenate([sink.ts_ns, [NOW, NOW]]))
    stages["agent"] = Observation("agent", "logs", np.concatenate([raw.ids, [7, 8, 9]]),
                                  np.concatenate([raw.ts_ns, [NOW] * 3]))
    assert routed.tenant is not None
    routed.tenant[routed.ids == 11] = (routed.tenant[routed.ids == 11] + 1) % 4
    res = account(ledger, "logs", stages, Options(start_ns=NOW))
    f = res["fates"]
    assert (f["sink_duplicates"], f["deduplicated"], f["misrouted"], f["lost"]) == (2, 3, 1, 0)
    assert verdict({"logs": res}, 0, 0, True) == ["logs: 2 duplicates at the sink",
                                                  "logs: 1 items in another tenant's topic"]


def test_health_spans_must_be_filtered_unless_the_generator_skipped_the_agent() -> None:
    ledger = _ledger("traces", health_share=0.3)
    led = ledger["traces"]
    health = (led.np("flags") & HEALTH) != 0
    res = account(ledger, "traces", _stages(ledger, "traces", ~health, DELAYS), Options(start_ns=NOW))
    assert res["fates"]["filtered"] == health.sum() > 0
    assert res["fates"]["lost"] == 0
    leaked = account(ledger, "traces", _stages(ledger, "traces", np.ones(led.items, bool), DELAYS),
                     Options(start_ns=NOW))
    assert leaked["fates"]["filter_leaks"] == health.sum()
    direct = account(ledger, "traces", _stages(ledger, "traces", ~health, DELAYS),
                     Options(agent_filter=False, start_ns=NOW))
    assert direct["fates"]["lost"] == health.sum()  # straight into Kafka nothing filters them


def _sampled(ledger: Ledger, keep_plain_share: float, drop_flag: int = 0) -> tuple[np.ndarray, np.ndarray]:
    led = ledger["traces"]
    trace, flags = led.np("trace"), led.np("flags")
    tflags = np.frombuffer(ledger.trace_flags, np.uint8)
    rng = np.random.default_rng(1)
    kept = (tflags & (ERROR | SLOW)) != 0
    plain = ~kept
    kept[plain] = rng.random(plain.sum()) < keep_plain_share
    if drop_flag:
        kept[np.flatnonzero(tflags & drop_flag)[0]] = False
    return kept[trace] & ((flags & HEALTH) == 0), kept


def test_tail_sampling_correct_decisions_pass_and_a_dropped_error_trace_fails() -> None:
    ledger = _ledger("traces", requests=60, health_share=0, error_share=0.1, slow_share=0.1)
    opts = Options(tail_sampling=True, sampling_percentage=20, start_ns=NOW)
    keep, _ = _sampled(ledger, 0.2)
    res = account(ledger, "traces", _stages(ledger, "traces", keep, DELAYS), opts)
    s = res["sampling"]
    assert s["ok"], s
    assert s["error_traces_kept"] == s["error_traces"] > 0
    assert res["fates"]["lost"] == 0 and res["fates"]["sampled_out"] == (~keep).sum()
    keep, _ = _sampled(ledger, 0.2, drop_flag=ERROR)
    bad = account(ledger, "traces", _stages(ledger, "traces", keep, DELAYS), opts)
    assert not bad["sampling"]["ok"]
    assert bad["sampling"]["error_traces_kept"] == bad["sampling"]["error_traces"] - 1
    skewed, _ = _sampled(ledger, 0.6)
    off = account(ledger, "traces", _stages(ledger, "traces", skewed, DELAYS), opts)
    assert not off["sampling"]["ok"] and off["sampling"]["z_score"] > 4


def test_a_kept_trace_missing_a_span_is_a_loss_not_a_sampling_decision() -> None:
    ledger = _ledger("traces", requests=10, health_share=0)
    opts = Options(tail_sampling=True, sampling_percentage=100, start_ns=NOW)
    keep = np.ones(ledger["traces"].items, bool)
    trace = ledger["traces"].np("trace")
    victim = np.flatnonzero(trace == trace[0])
    assert len(victim) > 1
    keep[victim[-1]] = False
    res = account(ledger, "traces", _stages(ledger, "traces", keep, DELAYS), opts)
    assert res["fates"]["lost"] == 1 and res["sampling"]["spans_missing_from_kept_traces"] == 1
    assert not res["sampling"]["ok"]
    assert LATE  # late spans are accounted like any other span of their trace


def test_percentiles_of_nothing_and_of_something() -> None:
    assert percentiles(np.array([])) == {"n": 0, "p50": None, "p95": None, "p99": None, "max": None}
    got = percentiles(np.arange(1, 101, dtype=float))
    assert (got["n"], got["p50"], got["max"]) == (100, 50.5, 100.0)


def test_report_files_say_pass_or_fail_and_hold_the_figures(tmp_path: Path) -> None:
    ledger = _ledger()
    res = account(ledger, "logs", _stages(ledger, "logs", np.ones(ledger["logs"].items, bool), DELAYS),
                  Options(start_ns=NOW))
    res["rates"] = {"offered": 50.0, "sink": 50.0}
    result = {
        "scenario": Scenario(name="unit", warmup="30s").model_dump(mode="json"), "started": "now",
        "passed": True,
        "problems": [], "duration_s": 4.0, "tail_sampling": "not configured by the scenario",
        "machine": {"cpus": 2, "memory_gib": 1.0, "python": "3.11", "load_average": 0.5},
        "generator": {"max_behind_s": 0.0}, "lag": {"max": 3, "end_of_load": 0}, "faults": [],
        "processes": {"agent": {"cpu_avg": 10.0, "cpu_max": 20.0, "rss_start_mib": 100.0,
                                "rss_peak_mib": 120.0, "rss_end_mib": 110.0}},
        "signals": {"logs": res},
    }
    files = write_results(result, tmp_path)
    assert json.loads(files["json"].read_text())["signals"]["logs"]["fates"]["delivered"] == 200
    text = files["markdown"].read_text()
    assert text.startswith("# Load test `unit`: PASS")
    assert "| delivered | 200 |" in text and "| end_to_end | 135.0 / 135.0 / 135.0 |" in text
    assert "| agent | 10.0 | 20.0 | 100.0 | 120.0 | 110.0 |" in text
    assert ("4.0 s of load via grpc (open loop, even arrivals) (after 30s of warm-up, not in the latencies)"
            in text)
    assert files["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    failed = markdown({**result, "passed": False, "problems": ["logs: 1 items lost (e.g. seq [3])"]})
    assert failed.startswith("# Load test `unit`: FAIL")
    assert "- **logs: 1 items lost (e.g. seq [3])**" in failed


def test_an_error_trace_held_back_upstream_past_decision_wait_is_reported_and_fails() -> None:
    """The stage decides on event time: a trace spread by upstream lag must still be kept whole."""
    ledger = _ledger("traces", requests=60, health_share=0, error_share=0.1, slow_share=0.1)
    led = ledger["traces"]
    keep, kept_traces = _sampled(ledger, 0.2, drop_flag=ERROR)
    stages = _stages(ledger, "traces", keep, DELAYS)
    everything = np.arange(led.items)
    arrival = led.np("scheduled_ns")[led.np("req")].astype(np.int64) + 30 * MS
    victim = np.flatnonzero(~kept_traces & ((np.frombuffer(ledger.trace_flags, np.uint8) & ERROR) != 0))[0]
    spans = np.flatnonzero(led.np("trace") == victim)
    assert len(spans) > 1
    arrival[spans[-1]] += 20_000 * MS  # an outage held one span back 20 s
    stages["dedup"] = Observation("dedup", "traces", everything.astype(np.int64), arrival,
                                  led.np("tenant").astype(np.int64))
    strict = Options(tail_sampling=True, sampling_percentage=20, start_ns=NOW, decision_wait_s=30)
    failed = account(ledger, "traces", stages, strict)["sampling"]
    assert not failed["ok"] and failed["error_traces_delayed"] == 0
    fair = Options(tail_sampling=True, sampling_percentage=20, start_ns=NOW, decision_wait_s=10)
    s = account(ledger, "traces", stages, fair)["sampling"]
    assert not s["ok"], s
    assert (s["error_traces_delayed"], s["error_traces_delayed_dropped"]) == (1, 1)
    assert s["error_traces_kept"] == s["error_traces"] - 1


def test_when_the_drain_timed_out_items_still_in_kafka_are_queued_not_lost() -> None:
    ledger = _ledger("logs", requests=3)
    keep = np.ones(ledger["logs"].items, bool)
    stages = _stages(ledger, "logs", keep, DELAYS)
    behind = np.arange(5, 12)  # reached dedup, not routing or the archive yet
    for stage, missing in (("agent", [0]), ("dedup", [0]), ("routing", [0, *behind]), ("sink", [0, *behind])):
        obs = stages[stage]  # item 0 never reached Kafka: lost either way
        mask = ~np.isin(obs.ids, missing)
        stages[stage] = Observation(stage, "logs", obs.ids[mask], obs.ts_ns[mask], obs.tenant[mask])
    drained = account(ledger, "logs", stages, Options(start_ns=NOW))["fates"]
    assert (drained["lost"], drained["queued_at_end"]) == (8, 0)
    cut = account(ledger, "logs", stages, Options(start_ns=NOW, drained=False))["fates"]
    assert (cut["lost"], cut["queued_at_end"]) == (1, 7)
