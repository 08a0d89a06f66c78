"""The tail stage's C splitter and summary (streams/stages/_tailwire.c) against the Python they replace."""

from __future__ import annotations

import random

import pytest
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Status

from kotel.otlp import OtlpDecodeError, samples
from kotel.otlp.sizing import encode_varint
from streams.stages import tail_core
from streams.stages.tail_core import fragments, regroup, regroup_python, summarize, summary_of

native = pytest.mark.skipif(tail_core._tailwire is None, reason="see test_the_native_splitter_is_built")


def test_the_native_splitter_is_built() -> None:
    """`make setup` builds it (gcc is part of the machine); without it the tail stage runs far dearer."""
    assert tail_core._tailwire is not None


def _shared(spans: int, services: int, traces: int, seed: int) -> ExportTraceServiceRequest:
    """Sample spans whose trace ids come from a pool of ``traces``, a few of them roots."""
    request = samples.traces(spans, services=services, seed=seed)
    rnd = random.Random(seed)
    pool = [rnd.randbytes(16) for _ in range(traces)]
    for rs in request.resource_spans:
        for ss in rs.scope_spans:
            for span in ss.spans:
                span.trace_id = rnd.choice(pool)
                if rnd.random() < 0.1:
                    span.ClearField("parent_span_id")
    return request


def _requests() -> list[ExportTraceServiceRequest]:
    out = [_shared(n, s, t, n + s + t) for n, s, t in
           ((1, 1, 1), (40, 1, 1), (40, 2, 3), (300, 3, 20), (1000, 4, 250), (64, 4, 64))]
    out.append(samples.traces(200, services=3, seed=5))  # one span per trace
    odd = _shared(50, 2, 5, 9)
    odd.resource_spans[0].schema_url = "https://example.com/r"
    odd.resource_spans[0].scope_spans[0].schema_url = "https://example.com/s"
    odd.resource_spans[1].ClearField("resource")
    odd.resource_spans[1].scope_spans[1].ClearField("scope")
    odd.resource_spans[1].scope_spans.append(ScopeSpans())  # a scope without spans
    odd.resource_spans.append(ResourceSpans())  # a resource without spans
    out.append(odd)
    out.append(ExportTraceServiceRequest())
    return out


@native
@pytest.mark.parametrize("index", range(9))
@pytest.mark.parametrize("partitions", [1, 3, 8])
def test_split_answers_what_regroup_answers(index: int, partitions: int) -> None:
    request = _requests()[index]
    value = request.SerializeToString()
    assert tail_core._tailwire.split(value, partitions) == regroup_python(request, partitions)
    assert regroup(request, partitions, value) == regroup_python(request, partitions)


def _field(tag: int, payload: bytes) -> bytes:
    return bytes([tag]) + encode_varint(len(payload)) + payload


def _by_hand(fields: list[bytes]) -> bytes:
    """A request of one resource and one scope whose fields are these, in this order."""
    return _field(0x0A, _field(0x12, b"".join(fields)))


def _span_fields(request: ExportTraceServiceRequest, extra: dict[int, bytes] | None = None
                 ) -> tuple[bytes, list[bytes]]:
    """The first scope's scope field and span fields; ``extra`` bytes appended inside some spans."""
    ss, extra = request.resource_spans[0].scope_spans[0], extra or {}
    return _field(0x0A, ss.scope.SerializeToString()), [
        _field(0x12, s.SerializeToString() + extra.get(i, b"")) for i, s in enumerate(ss.spans)]


@native
def test_split_keeps_fields_off_the_canonical_order_and_refuses_fields_between_spans() -> None:
    scope, spans = _span_fields(_shared(30, 1, 4, 3))
    url = _field(0x1A, b"https://example.com/s")
    value = _by_hand([url, *spans, scope])  # valid, off the order encoders write
    parts, count = tail_core._tailwire.split(value, 2)
    assert count == len(spans)
    request = ExportTraceServiceRequest.FromString(value)
    expected = {p: [ExportTraceServiceRequest.FromString(b) for b, _ in [bundle]]
                for p, bundle in regroup_python(request, 2)[0].items()}
    assert {p: [ExportTraceServiceRequest.FromString(b)] for p, (b, _) in parts.items()} == expected

    value = _by_hand([scope, spans[0], url, *spans[1:]])  # a field between two spans
    request = ExportTraceServiceRequest.FromString(value)  # valid protobuf: the Python path takes it
    assert tail_core._tailwire.split(value, 2) is None
    assert regroup(request, 2, value) == regroup_python(request, 2)


@native
@pytest.mark.parametrize("trace_id", [b"", b"\x01" * 8, bytes(16)])
def test_a_span_without_a_valid_trace_id_is_left_to_the_python_path(trace_id: bytes) -> None:
    request = _shared(20, 1, 3, 1)
    request.resource_spans[0].scope_spans[0].spans[3].trace_id = trace_id
    value = request.SerializeToString()
    assert tail_core._tailwire.split(value, 3) is None
    with pytest.raises(OtlpDecodeError, match="trace id"):
        regroup(request, 3, value)


def _decodes(value: bytes) -> ExportTraceServiceRequest | None:
    try:
        return ExportTraceServiceRequest.FromString(value)
    except DecodeError:
        return None


def _same_bundles(found: tuple[tail_core.Bundles, int], reference: tuple[tail_core.Bundles, int]
                  ) -> None:
    """The same spans per partition and entry; bytes may differ where Python re-encodes what C copies
    (a mutated field number puts a span's fields off the canonical order)."""
    assert list(found[0]) == list(reference[0]) and found[1] == reference[1]
    for p, (bundle, index) in found[0].items():
        assert fragments(bundle, index) == fragments(bundle)  # the index describes the bundle
        theirs = reference[0][p][0]
        assert [(f.trace_id, f.spans, f.root) for f in fragments(bundle)] == [
            (f.trace_id, f.spans, f.root) for f in fragments(theirs)]
        assert ExportTraceServiceRequest.FromString(bundle) == ExportTraceServiceRequest.FromString(theirs)


@native
def test_truncated_and_mutated_records_split_as_regroup_or_not_at_all() -> None:
    """What upb decodes (the stage decodes every record first) C splits as Python does, or refuses."""
    value = _shared(12, 2, 3, 4).SerializeToString()
    rnd = random.Random(11)
    candidates = [value[:n] for n in range(len(value))]
    for _ in range(3000):
        mutated = bytearray(value)
        mutated[rnd.randrange(len(value))] = rnd.randrange(256)
        candidates.append(bytes(mutated))
    agreed = 0
    for candidate in candidates:
        found = tail_core._tailwire.split(candidate, 3)
        request = _decodes(candidate)
        if request is None or found is None:
            continue
        try:
            reference = regroup_python(request, 3)
        except OtlpDecodeError:
            pytest.fail("C split a record whose trace ids Python refuses")
        _same_bundles(found, reference)
        agreed += 1
    assert agreed > 500  # most one-byte changes land in span contents, which both copy


@native
def test_summaries_match_the_decoded_trace() -> None:
    for request in _requests():
        value = request.SerializeToString()
        for bundle, index in regroup_python(request, 3)[0].values():
            for fragment in fragments(bundle, index):
                decoded = ExportTraceServiceRequest.FromString(fragment.framed)
                assert summarize(fragment.framed) == summary_of(decoded.resource_spans)
        assert summarize(value) == summary_of(request.resource_spans)


@native
def test_a_summary_merges_status_fields_and_reads_unset_times_as_protobuf_does() -> None:
    request = _shared(12, 1, 1, 2)
    spans = request.resource_spans[0].scope_spans[0].spans
    spans[0].start_time_unix_nano = 0
    spans[1].status.code = Status.STATUS_CODE_ERROR
    spans[2].status.message = "no code: UNSET"
    error, message_only = _field(0x7A, b"\x18\x02"), _field(0x7A, b"\x12\x01x")
    scope, fields = _span_fields(request, {3: error + message_only,  # merged: still ERROR
                                           4: error + _field(0x7A, b"\x18\x01")})  # merged: OK
    value = _by_hand([scope, *fields])
    decoded = ExportTraceServiceRequest.FromString(value)
    codes = [s.status.code for s in decoded.resource_spans[0].scope_spans[0].spans]
    assert codes[3:5] == [Status.STATUS_CODE_ERROR, Status.STATUS_CODE_OK]
    summary = summarize(value)
    assert summary == summary_of(decoded.resource_spans)
    assert summary is not None and summary.status_codes == 0b111


@native
def test_a_span_id_not_8_bytes_is_left_to_the_decoded_path() -> None:
    request = _shared(5, 1, 1, 2)
    request.resource_spans[0].scope_spans[0].spans[2].span_id = b"\x01" * 4
    assert summarize(request.SerializeToString()) is None
