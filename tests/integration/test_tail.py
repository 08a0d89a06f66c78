"""The tail-sampling stage against the real broker: `kotel worker tail` processes, traces in and out.

The workload is generated with known properties: every trace's spans come from several service
instances, shuffled across records, and some spans are held back until after the decisions (late).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from kotel.otlp import Signal
from tests.integration.stage_support import (
    Feed,
    Headers,
    Out,
    StageEnv,
    headers_of,
    produce,
    read_all,
    wait_until,
)
from tests.unit.otlp_builders import build

POLICIES = """      policies:
        - {name: errors, type: status_code, status_code: {status_codes: [ERROR]}}
        - {name: slow, type: latency, latency: {threshold_ms: 1000}}
        - {name: share, type: probabilistic, probabilistic: {sampling_percentage: 20}}
"""
GATEWAY = "  processors:\n    tail_sampling:\n      decision_wait: 1500ms\n" + POLICIES
ALWAYS = ("  processors:\n    tail_sampling:\n      decision_wait: 4s\n"
          "      policies: [{name: all, type: always_sample}]\n")
HEADERS: Headers = [("kotel.tenant", b"tenant-a"), ("kotel.signal", b"traces"),
                    ("kotel.schema", b"otlp-proto-v1")]
INSTANCES = 8
MS = 1_000_000


@dataclass
class Trace:
    trace_id: bytes
    spans: list[tuple[str, Span]]  # (instance, span)
    error: bool = False
    slow: bool = False
    late: list[tuple[str, Span]] = field(default_factory=list)


def make_trace(rng: random.Random, n: int, late: bool) -> Trace:
    """3 to 6 spans over several instances; 5 % with an ERROR span, 6 % longer than one second."""
    tid = rng.randbytes(16)
    error, slow = n % 20 == 7, n % 50 in (11, 12, 13)
    count = 3 + n % 4
    root_id, start = rng.randbytes(8), 1_700_000_000_000 * MS + n * MS
    length = 1500 * MS if slow else 80 * MS
    root = Span(trace_id=tid, span_id=root_id, name="GET /", start_time_unix_nano=start,
                end_time_unix_nano=start + length)
    spans = [(f"i-{n % INSTANCES}", root)]
    for j in range(1, count):
        status = Status(code=Status.STATUS_CODE_ERROR if error and j == 1 else Status.STATUS_CODE_OK)
        spans.append((f"i-{(n + j) % INSTANCES}", Span(
            trace_id=tid, span_id=rng.randbytes(8), parent_span_id=root_id, name=f"op-{j}", status=status,
            start_time_unix_nano=start + j * MS, end_time_unix_nano=start + j * MS + 10 * MS)))
    trace = Trace(tid, spans, error, slow)
    if late:
        trace.late = [spans.pop()]  # a child without the ERROR status: the decision does not need it
    return trace


def records(spans: list[tuple[str, Span]], rng: random.Random,
            size: int = 150) -> list[tuple[bytes, bytes, Headers]]:
    """Shuffled spans as records of one instance each (the deduped topic's key), out of order."""
    rng.shuffle(spans)
    by_instance: dict[str, list[Span]] = {}
    for instance, s in spans:
        by_instance.setdefault(instance, []).append(s)
    out = []
    for instance, group in by_instance.items():
        for i in range(0, len(group), size):
            request = build(Signal.TRACES, ({"service.name": "shop", "service.instance.id": instance},
                                            [group[i:i + size]]))
            out.append((instance.encode(), request.SerializeToString(), HEADERS))
    rng.shuffle(out)
    return out


def span_ids(outs: list[Out]) -> Counter[bytes]:
    requests = [ExportTraceServiceRequest.FromString(o.value) for o in outs]
    return Counter(s.span_id for r in requests for rs in r.resource_spans for ss in rs.scope_spans
                   for s in ss.spans)


@pytest.fixture
def env(kafka_bootstrap: str, tmp_path: Path) -> Iterator[StageEnv]:
    with StageEnv(kafka_bootstrap, tmp_path, GATEWAY, partitions=3) as stage_env:
        yield stage_env


def test_20k_traces_keep_errors_and_slow_ones_whole_sample_the_share_and_late_spans_follow(
        env: StageEnv) -> None:
    names, boot = env.topology.topic_names, env.bootstrap
    worker = env.worker("tail").start().wait_ready()
    rng = random.Random(8)
    traces = [make_trace(rng, n, late=n % 10 == 3) for n in range(20_000)]
    sent = 0
    for i in range(0, len(traces), 1000):
        # Each thousand traces once the worker took the previous ones in: a trace's spans then reach it
        # within a fraction of decision_wait, as they do when the stage keeps up with its input.
        sent += produce(boot, names.deduped("traces"),
                        records([s for t in traces[i:i + 1000] for s in t.spans], rng))
        wait_until(lambda n=sent: worker.metric("kotel_stage_records_in_total") >= n, 30, "the records")
    wait_until(lambda: worker.metric("kotel_tail_traces_decided_total") >= len(traces), 90,
               "every trace to be decided")
    late = [s for t in traces for s in t.late]
    produce(boot, names.deduped("traces"), records(late, rng))
    wait_until(lambda: worker.metric("kotel_tail_late_spans_total") >= len(late), 60, "the late spans")

    outs = read_all(boot, names.sampled_traces, at_least=1, settle=2.0)
    got = span_ids(outs)
    assert max(got.values()) == 1, "a span was emitted twice"
    kept = [t for t in traces if t.spans[0][1].span_id in got]
    kept_ids = {t.trace_id for t in kept}
    for t in traces:
        every = {s.span_id for _, s in t.spans + t.late}
        if t.trace_id in kept_ids:
            assert every <= got.keys(), f"sampled trace {t.trace_id.hex()} is incomplete"
        else:
            assert not every & got.keys(), f"dropped trace {t.trace_id.hex()} has spans in the output"
    missed = [(t.error, t.slow) for t in traces if (t.error or t.slow) and t.trace_id not in kept_ids]
    assert missed == []
    rest = [t for t in traces if not (t.error or t.slow)]
    share = sum(t.trace_id in kept_ids for t in rest) / len(rest)
    assert abs(share - 0.20) <= 0.02, f"probabilistic share {share:.3f}"
    assert len(got) == sum(len(t.spans) + len(t.late) for t in kept)
    # Counters: every trace decided once, the dropped ones by policy '', late spans with their decision.
    assert worker.metric("kotel_tail_traces_decided_total", decision="dropped") == len(traces) - len(kept)
    assert worker.metric("kotel_tail_traces_decided_total", decision="sampled", policy="errors") == sum(
        t.error for t in traces)
    late_kept = sum(len(t.late) for t in kept)
    assert worker.metric("kotel_tail_late_spans_total", decision="sampled") == late_kept
    assert worker.metric("kotel_tail_late_spans_total", decision="dropped") == len(late) - late_kept
    assert worker.metric("kotel_tail_late_span_lateness_seconds_count") == len(
        [t for t in traces if t.late])  # one observation per late fragment, here one span each
    slices = worker.metric("kotel_tail_decision_slice_seconds_count")  # wall and CPU time of each slice
    assert slices > 0 and worker.metric("kotel_tail_decision_slice_cpu_seconds_count") == slices
    assert 0 < worker.metric("kotel_tail_decision_slice_cpu_seconds_sum") <= worker.metric(
        "kotel_tail_decision_slice_seconds_sum") * 1.05  # a thread's CPU time cannot exceed its wall time
    first = headers_of(outs[0])
    assert first["kotel.tenant"] == "tenant-a" and first["kotel.signal"] == "traces"
    trace_ids = {o.key for o in outs}
    assert trace_ids == {t.trace_id.hex().encode() for t in kept}  # keyed by trace id
    assert worker.stop() == 0


def test_invalid_records_go_to_the_dead_letter_topic_and_the_stage_goes_on(env: StageEnv) -> None:
    names, boot = env.topology.topic_names, env.bootstrap
    worker = env.worker("tail").start().wait_ready()
    bad_id = build(Signal.TRACES, ({}, [[Span(trace_id=b"\x01" * 8, span_id=b"\x02" * 8)]]))
    good = make_trace(random.Random(1), 7, late=False)  # an ERROR trace: sampled
    produce(boot, names.deduped("traces"), [(b"i-1", b"\xff\xff not protobuf", HEADERS),
                                             (b"i-1", bad_id.SerializeToString(), HEADERS),
                                             *records(list(good.spans), random.Random(2))])
    dead = read_all(boot, names.deadletter, at_least=2)
    reasons = [headers_of(d)["kotel.dlq.reason"] for d in dead]
    assert reasons == ["invalid OTLP/protobuf ExportTraceServiceRequest: malformed wire format (truncated, "
                       "or not a protobuf message)",
                       "invalid OTLP span: resourceSpans[0].scopeSpans[0].spans[0].traceId: expected 16 "
                       "bytes, got 8"]
    assert dead[0].value == b"\xff\xff not protobuf" and headers_of(dead[0])["kotel.tenant"] == "tenant-a"
    outs = read_all(boot, names.sampled_traces, at_least=1, timeout=30)
    assert set(span_ids(outs)) == {s.span_id for _, s in good.spans}
    assert worker.metric("kotel_stage_deadlettered_records_total", reason="invalid_otlp") == 2
    assert worker.stop() == 0


class Load:
    """Traces for always_sample, produced until stopped; every span must come out exactly once."""

    def __init__(self) -> None:
        self.rng = random.Random(5)
        self.sent: list[bytes] = []
        self.n = 0

    def batch(self, count: int) -> list[tuple[bytes, bytes, Headers]]:
        spans = []
        for _ in range(count):
            trace = make_trace(self.rng, self.n, late=False)
            self.n += 1
            spans.extend(trace.spans)
            self.sent.extend(s.span_id for _, s in trace.spans)
        return records(spans, self.rng, size=40)


def test_kill_9_under_load_loses_no_sampled_span_and_emits_none_twice(kafka_bootstrap: str,
                                                                     tmp_path: Path) -> None:
    routed = (f"{ALWAYS}    routing: {{table: [{{value: tenant-a, exporters: [file/archive]}}]}}\n"
              f"  exporters:\n    file/archive: {{path: \"{tmp_path / 'archive'}\"}}\n")
    with StageEnv(kafka_bootstrap, tmp_path, routed, partitions=4) as env:
        names, boot = env.topology.topic_names, env.bootstrap
        env.worker("route").start().wait_ready()  # downstream as deployed: tenant topics must be exact too
        victim = env.worker("tail", "victim").start().wait_ready()
        survivor = env.worker("tail", "survivor").start().wait_ready()
        load = Load()
        with Feed(boot, names.deduped("traces"), lambda: load.batch(100)):
            wait_until(lambda: victim.metric("kotel_tail_traces_decided_total") > 200
                       and survivor.metric("kotel_tail_traces_decided_total") > 200, 60,
                       "both workers to decide")
            victim.kill()
            time.sleep(3)
            # Back on its own disk, which has no write-ahead log: RocksDB returns what it had flushed,
            # either from before the partitions went live or with their dirty mark (then rebuilt).
            revived = env.worker("tail", "victim").start().wait_ready()
            wait_until(lambda: revived.metric("kotel_tail_traces_decided_total") > 0, 90,
                       "the revived worker to decide on partitions it took back")
        total = env.end_offsets(names.deduped("traces"))
        wait_until(lambda: env.committed("tail", names.deduped("traces")) == total, 120,
                   "the survivor to regroup and commit every record")
        wait_until(lambda: len(span_ids(read_all(boot, names.sampled_traces, settle=0.5))) >= len(load.sent),
                   120, "every span in the output")
        got = span_ids(read_all(boot, names.sampled_traces, settle=2.0))
        assert set(got) == set(load.sent), f"{len(set(load.sent) - set(got))} spans lost"
        assert max(got.values()) == 1, f"{sum(1 for c in got.values() if c > 1)} spans emitted twice"
        assert "Worker ready" in survivor.log()

        def tenant_topics() -> Counter[bytes]:
            return (span_ids(read_all(boot, names.tenant("tenant-a", "traces"), settle=0.5))
                    + span_ids(read_all(boot, names.unrouted("traces"), settle=0.5)))
        wait_until(lambda: len(tenant_topics()) >= len(load.sent), 120, "every span in the tenant topics")
        routed_ids = tenant_topics()
        assert set(routed_ids) == set(load.sent)
        assert max(routed_ids.values()) == 1, f"{sum(c > 1 for c in routed_ids.values())} spans routed twice"
