"""The tail stage's own metrics: what became of each trace and span, beside the worker's generic counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENESS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900)


class TailMetrics:
    """What became of each trace and span, beside the worker's generic counters."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.traces = Counter("kotel_tail_traces_decided", "Traces decided, by decision and deciding policy "
                              "('' when none matched)", ["decision", "policy"], registry=r)
        self.spans = Counter("kotel_tail_spans_decided", "Spans of decided traces, by decision and policy",
                             ["decision", "policy"], registry=r)
        self.late = Counter("kotel_tail_late_spans", "Spans arriving after their trace's decision, which "
                            "they follow", ["decision"], registry=r)
        self.lateness = Histogram("kotel_tail_late_span_lateness_seconds", "Time between a trace's decision "
                                  "and its late spans", ["decision"], buckets=_LATENESS, registry=r)
        self.truncated = Counter("kotel_tail_truncated_spans", "Spans dropped because their trace reached a "
                                 "limit", ["limit"], registry=r)
        self.early = Counter("kotel_tail_early_decisions", "Traces decided before decision_wait, by limit",
                             ["reason"], registry=r)
        self.primed = Counter("kotel_tail_recovered_spans", "Emitted spans found in the output after a "
                              "takeover and not emitted again", registry=r)
        self.pending = Gauge("kotel_tail_pending_traces", "Traces waiting for a decision (active "
                             "partitions)", registry=r)
        self.slice = Histogram("kotel_tail_decision_slice_seconds", "Event-loop time of one slice of "
                               "decisions", buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1), registry=r)
        # Beside the wall time: a slice the OS preempted (or that waited on a disk) shows a long wall
        # time with a short CPU time; a slice that is itself too much work shows both.
        self.slice_cpu = Histogram("kotel_tail_decision_slice_cpu_seconds", "CPU time of the event-loop "
                                   "thread in one slice of decisions",
                                   buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1), registry=r)
        self.bad_watermarks = Counter("kotel_tail_bad_watermarks", "Bundles whose watermark headers were "
                                      "malformed and ignored (their record time counted)", registry=r)
        self.clock_lag = Gauge("kotel_tail_decision_clock_lag_seconds", "How far the slowest active "
                               "partition's decision clock is behind the wall clock", registry=r)
