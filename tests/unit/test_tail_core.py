"""Tail sampling's pure part: regrouping, fragments, the RocksDB trace state and its replay."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans, Span, Status
from rocksdict import Options, Rdict

from kotel.otlp import OtlpDecodeError
from streams.stages import tail_core
from streams.stages.tail_core import (
    NO_COVER,
    ClockRecord,
    Verdict,
    decode_record,
    drop_spans,
    encode_bundle,
    encode_clock,
    encode_decisions,
    fragments,
    regroup,
    span_ids,
    trace_partition,
)
from streams.stages.tail_policy_leaves import TraceData
from streams.stages.tail_state import Limits, TraceState
from tests.unit.otlp_builders import kvs


@pytest.fixture(autouse=True, params=["native", "python"])
def wire_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test twice: with the C splitter and summary (streams/stages/_tailwire.c), and without."""
    if request.param == "python":
        monkeypatch.setattr(tail_core, "_tailwire", None)
    elif tail_core._tailwire is None:
        pytest.skip("the C extension is not built (test_tailwire.py fails for that)")


LIMITS = Limits(decision_wait_ms=1000, root_wait_ms=0, max_spans=100, max_bytes=1 << 20, num_traces=1000,
                sampled_cache=100, dropped_cache=100)


def tid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def sid(n: int) -> bytes:
    return n.to_bytes(8, "big")


def span(trace: int, n: int, parent: int = 1, error: bool = False) -> Span:
    return Span(trace_id=tid(trace), span_id=sid(n), parent_span_id=sid(parent) if parent else b"",
                name=f"s{n}", start_time_unix_nano=n,
                status=Status(code=Status.STATUS_CODE_ERROR if error else Status.STATUS_CODE_UNSET))


def request(*resources: tuple[str, list[list[Span]]]) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    for instance, scopes in resources:
        rs = req.resource_spans.add(schema_url="https://opentelemetry.io/schemas/1.21.0")
        rs.resource.attributes.extend(kvs({"service.name": "shop", "service.instance.id": instance}))
        for i, spans in enumerate(scopes):
            rs.scope_spans.append(ScopeSpans(spans=spans))
            rs.scope_spans[-1].scope.name = f"lib-{i}"
    return req


def bundle_of(*spans: Span, instance: str = "i-1") -> bytes:
    """A bundle as regroup writes it, with every span in one partition."""
    req = request((instance, [list(spans)]))
    ((value, index),) = regroup(req, 1, req.SerializeToString())[0].values()
    assert fragments(value, index) == fragments(value)  # the index says what parsing finds
    return value


class ErrorsSampled:
    """A stand-in policy: sampled when a span has status ERROR (the policies have their own tests)."""

    def __init__(self) -> None:
        self.seen: list[tuple[bytes, int]] = []

    def decide(self, trace_id: bytes, trace: TraceData) -> tuple[bool, str]:
        spans = [s for rs in trace.resources for ss in rs.scope_spans for s in ss.spans]
        self.seen.append((trace_id, len(spans)))
        error = any(s.status.code == Status.STATUS_CODE_ERROR for s in spans)
        return (True, "errors") if error else (False, "")


@pytest.fixture
def open_db(tmp_path: Path) -> Iterator[Any]:
    dbs: list[Rdict] = []

    def make(name: str = "p0") -> Rdict:
        db = Rdict(str(tmp_path / name), options=Options(raw_mode=True))
        dbs.append(db)
        return db

    yield make
    for db in dbs:
        db.close()


def stored(db: Rdict, *prefixes: bytes) -> list[bytes]:
    """The keys of ``db`` that start with one of ``prefixes`` (one byte each)."""
    return [k for k, _ in db.items() if k[:1] in prefixes]


def ids_of(value: bytes) -> list[int]:
    return [int.from_bytes(s, "big") for s in span_ids(ExportTraceServiceRequest.FromString(value))]


def test_regroup_bundles_one_trace_per_entry_and_keeps_resource_and_scope() -> None:
    req = request(("i-1", [[span(1, 1), span(2, 2), span(1, 3)], [span(3, 4)]]),
                  ("i-2", [[span(2, 5), span(2, 6)]]))
    out, count = regroup(req, 4)
    assert count == 6
    expected_partitions = {trace_partition(tid(t), 4) for t in (1, 2, 3)}
    assert set(out) == expected_partitions
    seen: dict[bytes, list[int]] = {}
    for value, index in out.values():
        assert fragments(value, index) == fragments(value)
        bundle = ExportTraceServiceRequest.FromString(value)
        for rs in bundle.resource_spans:
            traces = {s.trace_id for ss in rs.scope_spans for s in ss.spans}
            assert len(traces) == 1  # one trace per entry
            (trace,) = traces
            assert out[trace_partition(trace, 4)][0] == value
            assert rs.schema_url == "https://opentelemetry.io/schemas/1.21.0"
            assert rs.resource.attributes[1].value.string_value in ("i-1", "i-2")
            for ss in rs.scope_spans:
                seen.setdefault(trace, []).extend(int.from_bytes(s.span_id, "big") for s in ss.spans)
                assert ss.scope.name in ("lib-0", "lib-1")
    assert seen == {tid(1): [1, 3], tid(2): [2, 5, 6], tid(3): [4]}


def test_a_single_trace_resource_is_forwarded_as_its_own_bytes() -> None:
    req = request(("i-1", [[span(7, 1), span(7, 2)], [span(7, 3)]]))
    ((value, _),) = regroup(req, 3)[0].values()
    assert value == req.SerializeToString()


def test_fragments_group_a_bundle_by_trace_with_span_counts_and_roots() -> None:
    req = request(("i-1", [[span(1, 1, parent=0), span(2, 2), span(1, 3)]]), ("i-2", [[span(2, 4)]]))
    ((value, index),) = regroup(req, 1)[0].values()
    frags = {f.trace_id: f for f in fragments(value, index)}
    assert list(frags.values()) == fragments(value)
    assert set(frags) == {tid(1), tid(2)}
    assert (frags[tid(1)].spans, frags[tid(1)].root) == (2, True)
    assert (frags[tid(2)].spans, frags[tid(2)].root) == (2, False)
    assert ids_of(frags[tid(2)].framed) == [2, 4]  # both resources' entries, framed as a request


def test_regroup_refuses_a_span_without_a_valid_trace_id() -> None:
    bad = Span(trace_id=bytes(16), span_id=sid(1))
    with pytest.raises(OtlpDecodeError) as err:
        regroup(request(("i-1", [[span(1, 1), bad]])), 2)
    assert str(err.value) == ("invalid OTLP span: trace id 00000000000000000000000000000000 is not 16 bytes "
                              "with one of them non-zero")


def test_fragments_refuse_a_record_that_mixes_traces_in_an_entry() -> None:
    mixed = request(("i-1", [[span(1, 1), span(2, 2)]])).SerializeToString()
    with pytest.raises(OtlpDecodeError) as err:
        fragments(mixed)
    assert str(err.value) == "repartition record entry does not hold exactly one valid trace"
    with pytest.raises(OtlpDecodeError) as err:
        fragments(b"\xff\xff")
    assert str(err.value) == "repartition record is not an OTLP ExportTraceServiceRequest"


def test_drop_spans_removes_emitted_and_repeated_spans_and_prunes_empty_entries() -> None:
    req = request(("i-1", [[span(1, 1), span(1, 2)], [span(1, 3)]]), ("i-2", [[span(1, 2), span(1, 4)]]))
    value, kept = drop_spans(req, {sid(3)})
    assert sorted(kept) == [sid(1), sid(2), sid(4)]
    out = ExportTraceServiceRequest.FromString(value)
    assert [len(rs.scope_spans) for rs in out.resource_spans] == [1, 1]


def test_records_round_trip_and_garbage_is_not_a_record() -> None:
    bundle = bundle_of(span(1, 1))
    cover, rec = decode_record(encode_bundle((2, 40), 7, 1234, "tenant-a", bundle))  # type: ignore[misc]
    assert cover == (2, 40) and rec == (7, 1234, "tenant-a", bundle, b"")
    cover, rec = decode_record(encode_bundle((2, 40), 7, 1234, "", bundle, b"ix"))  # type: ignore[misc]
    assert rec == (7, 1234, "", bundle, b"ix")
    verdicts = [Verdict(tid(1), True, "errors", (sid(1), sid(2))), Verdict(tid(2), False, "", ())]
    cover, rec = decode_record(encode_decisions(NO_COVER, 99, verdicts, primed=True))  # type: ignore[misc]
    assert rec == (99, verdicts, True)
    assert decode_record(b"D" + b"\x00" * 12 + b"\x00" * 8 + b"\x00\x00\x00\x05") is None
    assert decode_record(encode_clock((1, 7), 123_456)) == ((1, 7), ClockRecord(123_456))
    assert decode_record(encode_clock((1, 7), 123_456)[:-1]) is None
    assert decode_record(b"") is None and decode_record(b"X" + b"\x00" * 20) is None


def test_a_trace_is_due_decision_wait_after_its_first_span_and_emitted_whole(open_db: Any) -> None:
    state, sampler = TraceState(open_db(), LIMITS), ErrorsSampled()
    state.commit(state.ingest(0, 10_000, "tenant-a", fragments(bundle_of(span(1, 1), span(2, 2)))))
    state.commit(state.ingest(1, 10_500, "tenant-a", fragments(bundle_of(span(1, 3, error=True)))))
    assert state.meta.pending == 2
    assert state.due(10_999, 100) == []
    assert sorted(state.due(11_000, 100)) == [(tid(1), "deadline"), (tid(2), "deadline")]
    plan = state.decide([tid(1), tid(2)], sampler)
    assert [(v.trace_id, v.sampled, v.policy) for v in plan.verdicts] == [(tid(1), True, "errors"),
                                                                          (tid(2), False, "")]
    (out,) = plan.outputs
    assert (out.trace_id, out.tenant, out.spans, sorted(ids_of(out.value))) == (tid(1), "tenant-a", 2, [1, 3])
    state.commit(state.settle(plan, plan.verdicts, 11_000))
    assert state.meta.pending == 0 and state.due(99_999, 100) == []
    assert state.trace(tid(1)) is None and state.decision(tid(1)).emitted == (sid(1), sid(3))  # type: ignore[union-attr]
    assert stored(state.db, b"t", b"f", b"d") == []  # buffers and index gone


def test_late_spans_follow_the_decision_and_count_their_lateness(open_db: Any) -> None:
    state, sampler = TraceState(open_db(), LIMITS), ErrorsSampled()
    state.commit(state.ingest(0, 0, "t", fragments(bundle_of(span(1, 1, error=True), span(2, 2)))))
    plan = state.decide([t for t, _ in state.due(1000, 10)], sampler)
    state.commit(state.settle(plan, plan.verdicts, 1000))
    late = state.ingest(1, 4000, "t", fragments(bundle_of(span(1, 3), span(1, 1), span(2, 4))))
    assert sorted(late.late) == [(False, 1, 3000), (True, 2, 3000)]
    (out,) = late.outputs  # the sampled trace's new span only: span 1 was emitted already
    assert (out.trace_id, ids_of(out.value)) == (tid(1), [3])
    assert late.buffered == 0
    state.commit(late)
    again = state.ingest(2, 5000, "t", fragments(bundle_of(span(1, 3))))  # a copy sent again upstream
    assert again.outputs == [] and again.late == [(True, 1, 4000)]


def test_an_input_offset_already_applied_is_skipped(open_db: Any) -> None:
    state = TraceState(open_db(), LIMITS)
    state.commit(state.ingest(5, 0, "t", fragments(bundle_of(span(1, 1)))))
    plan = state.ingest(5, 10, "t", fragments(bundle_of(span(1, 2))))
    assert plan.skipped and plan.buffered == 0
    assert state.trace(tid(1)).spans == 1  # type: ignore[union-attr]


def test_a_trace_with_an_older_deadline_than_those_scanned_is_still_found(open_db: Any) -> None:
    """Inputs re-read after a takeover carry their old timestamps; their traces must still be due."""
    state, sampler = TraceState(open_db(), LIMITS), ErrorsSampled()
    state.commit(state.ingest(0, 10_000, "t", fragments(bundle_of(span(1, 1)))))
    plan = state.decide([t for t, _ in state.due(11_000, 10)], sampler)
    state.commit(state.settle(plan, plan.verdicts, 11_000))
    state.commit(state.ingest(1, 2_000, "t", fragments(bundle_of(span(2, 2)))))
    assert state.due(11_000, 10) == [(tid(2), "deadline")]


def test_the_root_span_brings_the_deadline_forward(open_db: Any) -> None:
    state = TraceState(open_db(), LIMITS._replace(root_wait_ms=200))
    state.commit(state.ingest(0, 0, "t", fragments(bundle_of(span(1, 2)))))
    state.commit(state.ingest(1, 300, "t", fragments(bundle_of(span(1, 1, parent=0)))))
    assert state.due(499, 10) == [] and state.due(500, 10) == [(tid(1), "deadline")]
    assert state.trace(tid(1)).root_ms == 300  # type: ignore[union-attr]


def test_a_trace_over_max_spans_is_decided_early_and_truncated_with_a_counter(open_db: Any) -> None:
    state = TraceState(open_db(), LIMITS._replace(max_spans=3))
    first = state.ingest(0, 0, "t", fragments(bundle_of(*(span(1, n) for n in range(1, 4)))))
    assert first.early == {"max_spans_per_trace": 1}
    state.commit(first)
    assert state.due(0, 10) == [(tid(1), "deadline")]  # due at once, not after decision_wait
    more = state.ingest(1, 10, "t", fragments(bundle_of(span(1, 4), span(1, 5))))
    assert more.truncated == {"max_spans_per_trace": 2} and more.buffered == 0


def test_over_num_traces_the_oldest_are_decided_before_their_deadline(open_db: Any) -> None:
    state = TraceState(open_db(), LIMITS._replace(num_traces=2))
    for n in range(1, 5):
        state.commit(state.ingest(n, n * 10, "t", fragments(bundle_of(span(n, n)))))
    assert state.due(0, 10) == [(tid(1), "num_traces"), (tid(2), "num_traces")]


def test_the_decision_cache_keeps_the_newest_decisions_per_kind(open_db: Any) -> None:
    state, sampler = TraceState(open_db(), LIMITS._replace(dropped_cache=2)), ErrorsSampled()
    for n in range(1, 5):
        state.commit(state.ingest(n, 0, "t", fragments(bundle_of(span(n, n)))))
    plan = state.decide([tid(n) for n in range(1, 5)], sampler)
    state.commit(state.settle(plan, plan.verdicts, 1000))
    assert [state.decision(tid(n)) is not None for n in range(1, 5)] == [False, False, True, True]
    assert sorted(k[:1] for k in stored(state.db, b"n", b"s")) == [b"n", b"n"]
    # An evicted trace's late span starts a new pending trace, as in the Collector.
    plan = state.ingest(9, 2000, "t", fragments(bundle_of(span(1, 7))))
    assert plan.late == [] and plan.buffered == 1


def test_outputs_found_after_a_takeover_are_not_emitted_again(open_db: Any) -> None:
    state, sampler = TraceState(open_db(), LIMITS), ErrorsSampled()
    state.commit(state.ingest(0, 0, "t", fragments(bundle_of(span(1, 1), span(1, 2), span(1, 3)))))
    primed = state.prime({tid(1): [sid(1), sid(2)]}, 500)
    state.commit(primed)
    assert state.trace(tid(1)) is not None  # still pending: span 3 was not emitted yet
    plan = state.decide([tid(1)], sampler)
    (out,) = plan.outputs
    assert ids_of(out.value) == [3] and plan.verdicts[0].policy == "recovered"
    assert sampler.seen == []  # an emitted trace is sampled whatever the policies would say now


def test_replaying_the_records_rebuilds_the_same_state(open_db: Any) -> None:
    live, sampler = TraceState(open_db("live"), LIMITS._replace(dropped_cache=1)), ErrorsSampled()
    log: list[bytes] = []

    def ingest(offset: int, stamp: int, *spans: Span) -> None:
        bundle = bundle_of(*spans)
        plan = live.ingest(offset, stamp, "t", fragments(bundle))
        live.commit(plan, (0, offset))
        log.append(encode_bundle((0, offset), offset, stamp, "t", bundle))

    ingest(0, 0, span(1, 1, error=True), span(2, 2), span(3, 3))
    ingest(1, 100, span(1, 4), span(4, 5))
    primed = live.prime({tid(4): [sid(5)]}, 150)
    live.commit(primed)
    log.append(encode_decisions(NO_COVER, 150, primed.verdicts, primed=True))
    plan = live.decide([t for t, _ in live.due(1000, 10)], sampler)
    live.commit(live.settle(plan, plan.verdicts, 1000))
    log.append(encode_decisions(NO_COVER, 1000, plan.verdicts))
    ingest(2, 1500, span(1, 6), span(2, 7), span(5, 8))
    replica = TraceState(open_db("replica"), LIMITS._replace(dropped_cache=1))
    for record in log:
        assert replica.apply(record)
    assert dict(replica.db.items()) == dict(live.db.items())
    assert replica.meta == live.meta and replica.meta.cover == (0, 2)


def test_a_bundle_logged_before_the_verdict_it_followed_replays_as_late(open_db: Any) -> None:
    """The decider logs a verdict once its outputs are acknowledged, so a bundle ingested after the
    decision may precede it in the log; replay must still end where the live state did."""
    live, sampler = TraceState(open_db("live"), LIMITS), ErrorsSampled()
    first = bundle_of(span(1, 1, error=True), span(2, 2))
    live.commit(live.ingest(0, 0, "t", fragments(first)))
    plan = live.decide([t for t, _ in live.due(1000, 10)], sampler)
    live.commit(live.settle(plan, plan.verdicts, 1000))
    verdicts = plan.verdicts
    later = bundle_of(span(1, 3), span(2, 4))
    late = live.ingest(1, 1100, "t", fragments(later))
    assert [ids_of(o.value) for o in late.outputs] == [[3]]
    live.commit(late)
    log = [encode_bundle(NO_COVER, 0, 0, "t", first), encode_bundle(NO_COVER, 1, 1100, "t", later),
           encode_decisions(NO_COVER, 1000, verdicts)]
    replica = TraceState(open_db("replica"), LIMITS)
    for record in log:
        assert replica.apply(record)
    assert dict(replica.db.items()) == dict(live.db.items())
    assert replica.decision(tid(1)).emitted == (sid(1), sid(3))  # type: ignore[union-attr]


def test_the_decision_clock_is_logged_by_clock_records_not_by_input_times(open_db: Any) -> None:
    """A new owner starts deciding at the logged clock, so it must never be ahead of the watermark:
    an input's time is not (a caught-up source partition's input is ahead of a lagging one's)."""
    live = TraceState(open_db("live"), LIMITS)
    bundle = bundle_of(span(1, 1))
    live.commit(live.ingest(0, 5_000, "t", fragments(bundle)), (0, 3))
    assert live.meta.stream_ms == 0
    live.commit(live.clocked(4_000), (0, 4))
    plan = live.decide([tid(1)], ErrorsSampled())
    live.commit(live.settle(plan, plan.verdicts, 6_000))
    assert live.meta.stream_ms == 4_000
    log = [encode_bundle((0, 3), 0, 5_000, "t", bundle), encode_clock((0, 4), 4_000),
           encode_decisions(NO_COVER, 6_000, plan.verdicts)]
    replica = TraceState(open_db("replica"), LIMITS)
    for record in log:
        assert replica.apply(record)
    assert replica.meta == live.meta and replica.meta.cover == (0, 4)
    assert dict(replica.db.items()) == dict(live.db.items())
