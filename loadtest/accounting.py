"""Join the ledger with what each stage wrote: per-item fate, latencies, sampling correctness, timelines.

Pure functions over numpy arrays (no broker), so every rule here is unit-tested. Fates of an item that
the agent acknowledged, in this order: delivered (in the archive), dead-lettered, filtered (a /health
span, absent as it should be), sampled out (its whole trace was dropped by tail sampling, which may
happen only to traces neither failed nor slow), else lost. Items the agent refused (never acknowledged)
are counted apart: the delivery promise does not cover them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from loadtest.collect import Observation
from loadtest.generator.ledger import ACKED, ERROR, HEALTH, LATE, SLOW, WARMUP, Ledger, SignalLedger

STAGE_ORDER = ("agent", "dedup", "tail", "routing", "sink")
NONE = np.iinfo(np.int64).max


@dataclass(frozen=True)
class Options:
    agent_filter: bool = True  # False when the generator wrote straight into the raw topics
    tail_sampling: bool = False
    sampling_percentage: float = 0.0
    # A trace whose spans reached the tail stage's input further apart than this could not be decided
    # whole (an outage upstream held some back): it is reported apart, not held against the sampler.
    decision_wait_s: float = 0.0
    # False when the drain timed out: an acknowledged item still in a stage topic is then counted as
    # queued (durable in Kafka, not yet delivered), not as lost.
    drained: bool = True
    start_ns: int = 0  # time zero of the timelines (first measured request)
    bin_s: float = 1.0


def to_seq(led: SignalLedger, signal: str, ids: np.ndarray) -> np.ndarray:
    """Ledger sequence numbers of the identities found (-1: not an item of this run)."""
    if signal == "metrics":
        keys = led.np("key")
        if not len(keys) or not len(ids):
            return np.full(len(ids), -1, np.int64)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        pos = np.clip(np.searchsorted(sorted_keys, ids), 0, len(keys) - 1)
        return np.where(sorted_keys[pos] == ids, order[pos], -1).astype(np.int64)
    return np.where((ids >= 0) & (ids < led.items), ids, -1).astype(np.int64)


def _count(n: int, seq: np.ndarray) -> np.ndarray:
    valid = seq[seq >= 0]
    return np.bincount(valid, minlength=n)[:n] if n else np.zeros(0, np.int64)


def _first(n: int, seq: np.ndarray, ts: np.ndarray) -> np.ndarray:
    out = np.full(n, NONE, np.int64)
    mask = seq >= 0
    np.minimum.at(out, seq[mask], ts[mask])
    return out


def percentiles(values: np.ndarray) -> dict[str, float | int | None]:
    if not len(values):
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"n": len(values), "p50": round(float(p50), 2), "p95": round(float(p95), 2),
            "p99": round(float(p99), 2), "max": round(float(values.max()), 2)}


def account(ledger: Ledger, signal: str, stages: dict[str, Observation], opts: Options) -> dict[str, Any]:
    led = ledger[signal]
    n = led.items
    flags, req = led.np("flags").astype(np.int64), led.np("req").astype(np.int64)
    sent = req >= 0
    status = np.where(sent, led.np("status")[np.clip(req, 0, None)] if led.requests else 0, -1)
    acked = status == ACKED
    empty = Observation.empty("", signal)
    seqs = {name: to_seq(led, signal, obs.ids) for name, obs in stages.items()}
    counts = {name: _count(n, s) for name, s in seqs.items()}
    zero = np.zeros(n, np.int64)
    sink_count, dead = counts.get("sink", zero), counts.get("deadletter", zero) > 0
    delivered = sink_count > 0
    health = (flags & HEALTH) != 0 if (opts.agent_filter and signal == "traces") else np.zeros(n, bool)
    sampled_out = np.zeros(n, bool)
    sampling: dict[str, Any] = {"applicable": False}
    if signal == "traces" and opts.tail_sampling:
        arrival = _first(n, seqs["dedup"], stages["dedup"].ts_ns) if "dedup" in stages else None
        sampled_out, sampling = _sampling(ledger, led, delivered, health, acked, opts, arrival)
    lost = acked & ~health & ~delivered & ~dead & ~sampled_out
    queued = np.zeros(n, bool)
    if not opts.drained:
        for stage in ("agent", "dedup", "tail", "routing"):
            queued |= counts.get(stage, zero) > 0
        queued &= lost
        lost &= ~queued
    raw, deduped = counts.get("agent", zero), counts.get("dedup", zero)
    routed = stages.get("routing", empty)
    misrouted = 0
    if routed.tenant is not None and len(routed.ids):
        rseq = seqs["routing"]
        ok = rseq >= 0
        misrouted = int((routed.tenant[ok] != led.np("tenant")[rseq[ok]]).sum())
    fates = {
        "offered": int(sent.sum()),
        "acked": int(acked.sum()),
        "refused": int((sent & ~acked).sum()),
        "refused_but_delivered": int((sent & ~acked & delivered).sum()),
        "delivered": int((delivered & ~health).sum()),
        "filtered": int((health & ~delivered).sum()),
        "filter_leaks": int((health & delivered).sum()),
        "sampled_out": int((sampled_out & ~delivered).sum()),
        "dead_lettered": int((dead & ~delivered).sum()),
        "deduplicated": int(np.clip(raw - np.clip(deduped, 0, 1), 0, None).sum()),
        "duplicates_after_dedup": int(np.clip(deduped - 1, 0, None).sum()),
        "sink_duplicates": int(np.clip(sink_count - 1, 0, None).sum()),
        "misrouted": misrouted,
        "lost": int(lost.sum()),
        "queued_at_end": int(queued.sum()),
        "foreign_items": int(sum((s < 0).sum() for s in seqs.values())),
    }
    lost_examples = np.flatnonzero(lost)[:10].tolist()
    latency = _latency(led, stages, seqs, flags, opts)
    return {"fates": fates, "lost_examples": lost_examples, "sampling": sampling, "latency_ms": latency,
            "timeline": timeline(led, stages, seqs, opts)}


def _delayed(trace: np.ndarray, traces: int, spans: np.ndarray, arrival: np.ndarray | None,
             wait_s: float) -> np.ndarray:
    """Traces whose on-time spans reached the tail stage's input more than ``wait_s`` apart."""
    out = np.zeros(traces, bool)
    if arrival is None or wait_s <= 0:
        return out
    ok = spans & (arrival != NONE)
    first = np.full(traces, NONE, np.int64)
    last = np.zeros(traces, np.int64)
    np.minimum.at(first, trace[ok], arrival[ok])
    np.maximum.at(last, trace[ok], arrival[ok])
    seen = first != NONE
    out[seen] = (last[seen] - first[seen]) > wait_s * 1e9
    return out


def _sampling(ledger: Ledger, led: SignalLedger, delivered: np.ndarray, health: np.ndarray,
              acked: np.ndarray, opts: Options, arrival: np.ndarray | None = None
              ) -> tuple[np.ndarray, dict[str, Any]]:
    """Trace-level decisions: kept when any of its spans arrived; failed and slow traces must be. Those
    whose spans reached the tail stage further apart than decision_wait (held back upstream by lag or an
    outage) are counted as ``*_delayed``: the stage decides on event time, so they must be kept too."""
    percentage = opts.sampling_percentage
    trace = led.np("trace").astype(np.int64)
    flags = led.np("flags").astype(np.int64)
    traces = len(ledger.trace_flags)
    tflags = np.frombuffer(ledger.trace_flags, dtype=np.uint8).astype(np.int64) if traces else np.zeros(0)
    real = ~health & acked
    kept = np.zeros(traces, bool)
    kept[trace[delivered & real]] = True
    has_acked = np.zeros(traces, bool)
    has_acked[trace[real]] = True
    sampled_out = real & ~kept[trace]
    late = (flags & LATE) != 0
    delayed = _delayed(trace, traces, real & ~late, arrival, opts.decision_wait_s)
    err = has_acked & ((tflags & ERROR) != 0)
    slow = has_acked & ((tflags & SLOW) != 0) & ~err
    plain = has_acked & ~err & ~slow
    share = float(kept[plain].mean() * 100) if plain.any() else None
    p = percentage / 100
    z = None
    if share is not None and 0 < p < 1 and plain.sum() >= 30:
        z = (share / 100 - p) / math.sqrt(p * (1 - p) / plain.sum())
    late_leaks = int((late & delivered & ~kept[trace]).sum())  # cannot happen: kept is "any delivered"
    partial = int((real & ~delivered & kept[trace]).sum())
    result = {
        "applicable": True,
        "error_traces": int(err.sum()), "error_traces_kept": int(kept[err].sum()),
        "error_traces_delayed": int((err & delayed).sum()),
        "error_traces_delayed_dropped": int((err & delayed & ~kept).sum()),
        "slow_traces": int(slow.sum()), "slow_traces_kept": int(kept[slow].sum()),
        "slow_traces_delayed": int((slow & delayed).sum()),
        "slow_traces_delayed_dropped": int((slow & delayed & ~kept).sum()),
        "plain_traces": int(plain.sum()), "plain_kept_percent": None if share is None else round(share, 2),
        "expected_percent": percentage, "z_score": None if z is None else round(z, 2),
        "late_spans": int((late & real).sum()), "late_spans_of_kept_traces_delivered":
            int((late & real & delivered).sum()), "late_leaks": late_leaks,
        "spans_missing_from_kept_traces": partial,
    }
    result["ok"] = bool(not (err & ~kept).any() and not (slow & ~kept).any()
                        and (z is None or abs(z) <= 4.0) and partial == 0)
    return sampled_out, result


def _latency(led: SignalLedger, stages: dict[str, Observation], seqs: dict[str, np.ndarray],
             flags: np.ndarray, opts: Options) -> dict[str, Any]:
    n = led.items
    req = led.np("req").astype(np.int64)
    measured = (req >= 0) & ((flags & WARMUP) == 0)
    if led.requests:
        scheduled = np.where(req >= 0, led.np("scheduled_ns")[np.clip(req, 0, None)], NONE)
    else:
        scheduled = np.full(n, NONE, np.int64)
    firsts = {name: _first(n, seqs[name], stages[name].ts_ns) for name in STAGE_ORDER if name in stages}
    out: dict[str, Any] = {}
    previous = scheduled
    for name in STAGE_ORDER:
        if name not in firsts:
            continue
        here = firsts[name]
        ok = measured & (here != NONE) & (previous != NONE)
        out[name] = percentiles((here[ok] - previous[ok]) / 1e6)
        previous = here
    if "sink" in firsts:
        sink = firsts["sink"]
        ok = measured & (sink != NONE)
        out["end_to_end"] = percentiles((sink[ok] - scheduled[ok]) / 1e6)
        if "tail" in firsts:
            wait = firsts["tail"] - firsts["dedup"]
            ok2 = ok & (firsts["tail"] != NONE) & (firsts["dedup"] != NONE)
            without = (sink[ok2] - scheduled[ok2] - wait[ok2]) / 1e6
            out["end_to_end_without_decision_wait"] = percentiles(without)
    if led.requests:
        acked = (led.np("status") == ACKED) & (led.np("ack_ns") > 0)
        out["client_ack"] = percentiles((led.np("ack_ns")[acked] - led.np("scheduled_ns")[acked]) / 1e6)
    return out


def timeline(led: SignalLedger, stages: dict[str, Observation], seqs: dict[str, np.ndarray],
             opts: Options) -> dict[str, Any]:
    """Items per second at each stage, and end-to-end p50/p95 by second of scheduling."""
    req = led.np("req").astype(np.int64)
    if not led.requests or not opts.start_ns:
        return {}
    scheduled = led.np("scheduled_ns")
    ack = led.np("ack_ns")
    sent = req >= 0
    item_sched = scheduled[req[sent]]
    series: dict[str, np.ndarray] = {"offered": item_sched}
    item_ack = ack[req[sent]]
    series["accepted"] = item_ack[item_ack > 0]
    for name in STAGE_ORDER:
        if name in stages and len(stages[name].ts_ns):
            series[name] = stages[name].ts_ns
    top = max(int((v.max() - opts.start_ns) / 1e9 / opts.bin_s) + 1 for v in series.values() if len(v))
    bins = np.arange(top + 1) * opts.bin_s
    out: dict[str, Any] = {"bin_s": opts.bin_s}
    for name, values in series.items():
        rel = (values - opts.start_ns) / 1e9
        counts, _ = np.histogram(rel[rel >= 0], bins=bins)
        out[name] = (counts / opts.bin_s).round(1).tolist()
    if "sink" in stages:
        n = led.items
        sink_first = _first(n, seqs["sink"], stages["sink"].ts_ns)
        ok = sent & (sink_first != NONE)
        sched = np.full(n, NONE, np.int64)
        sched[sent] = item_sched
        rel_bin = ((sched[ok] - opts.start_ns) / 1e9 // opts.bin_s).astype(np.int64)
        lat = (sink_first[ok] - sched[ok]) / 1e6
        p50, p95 = [], []
        for b in range(top):
            v = lat[rel_bin == b]
            p50.append(round(float(np.percentile(v, 50)), 1) if len(v) else None)
            p95.append(round(float(np.percentile(v, 95)), 1) if len(v) else None)
        out["e2e_p50_ms"], out["e2e_p95_ms"] = p50, p95
    return out


def verdict(results: dict[str, dict[str, Any]], max_lost: int, max_sink_duplicates: int,
            check_sampling: bool) -> list[str]:
    """Why the run failed (empty when it passed); speed never fails a run."""
    problems = []
    for signal, res in results.items():
        f = res["fates"]
        if f["offered"] and f["delivered"] == 0:
            problems.append(f"{signal}: nothing delivered")
        if f["lost"] > max_lost:
            problems.append(f"{signal}: {f['lost']} items lost (e.g. seq {res['lost_examples'][:5]})")
        if f["sink_duplicates"] > max_sink_duplicates:
            problems.append(f"{signal}: {f['sink_duplicates']} duplicates at the sink")
        if f["misrouted"]:
            problems.append(f"{signal}: {f['misrouted']} items in another tenant's topic")
        if f["filter_leaks"]:
            problems.append(f"{signal}: {f['filter_leaks']} /health spans passed the filter")
        s = res["sampling"]
        if check_sampling and s.get("applicable") and not s.get("ok"):
            problems.append(f"{signal}: sampling incorrect: {s}")
        for backend, b in res.get("backends", {}).items():  # loadtest/readback.py
            if "error" in b:
                problems.append(f"{signal} at {backend}: read-back failed: {b['error']}")
                continue
            bad = [f"{b[k]} {k}" for k in ("missing", "duplicates", "unexpected") if b[k]]
            if bad:
                note = f" ({b['note']})" if b.get("note") else ""
                problems.append(f"{signal} at {backend}: {', '.join(bad)} of {b['expected']} expected "
                                f"(e.g. {'; '.join(b['examples'][:3])}){note}")
    return problems
