"""Dedup's wire formats without a broker: spans read on the wire (framing checked), changelog records."""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from kotel.otlp import OtlpDecodeError, Signal, decode_protobuf, samples, spanwire
from kotel.otlp.sizing import encode_varint
from kotel.otlp.spanwire import read_many, read_many_python, read_spans
from streams.stages.dedup_core import apply_keep, identify, identify_record, identify_records
from streams.stages.dedup_store import changelog_records, decode_changelog, encode_changelog
from tests.unit.dedup_support import RES, seen_store, spans
from tests.unit.otlp_builders import build

MALFORMED = (r"^invalid OTLP/protobuf ExportTraceServiceRequest: malformed wire format \(truncated, or not "
             r"a protobuf message\)$")


def request_of(found: list[Span]) -> bytes:
    return build(Signal.TRACES, (RES, [found])).SerializeToString()  # type: ignore[no-any-return]


# --- the wire path (identify_record) ---------------------------------------------------------------
def test_wire_path_reads_and_rebuilds_like_the_decoded_path() -> None:
    value = samples.traces(300, services=3, seed=5).SerializeToString()  # start times out of order
    record = identify_record(Signal.TRACES, value)
    decoded = decode_protobuf(Signal.TRACES, value)
    expected = identify(Signal.TRACES, decoded)
    assert record.wire is not None and record.request is None
    assert record.items.ids == expected.ids and record.items.unordered == expected.unordered
    keep = [random.Random(n).random() < 0.6 for n in range(len(expected.ids))]
    out = record.output(Signal.TRACES, keep)
    assert out is not None
    assert decode_protobuf(Signal.TRACES, out) == apply_keep(Signal.TRACES, decoded, keep, expected)
    assert record.output(Signal.TRACES, [False] * len(keep)) is None


def test_wire_path_returns_an_ordered_all_new_record_as_is() -> None:
    value = build(Signal.TRACES, (RES, [spans(1, 2, 3)])).SerializeToString()
    record = identify_record(Signal.TRACES, value)
    assert record.wire is not None and record.output(Signal.TRACES, [True] * 3) is value
    with pytest.raises(ValueError, match=r"^keep has 2 flags but the record has 3 items$"):
        record.output(Signal.TRACES, [True, True])


def _framed(tag: bytes, body: bytes) -> bytes:
    return tag + encode_varint(len(body)) + body


def _off_layout(case: str) -> bytes:
    span = spans(5)[0]
    if case == "ids last":  # valid protobuf, fields out of the usual order
        raw = span.SerializeToString()
        return _framed(b"\x0a", _framed(b"\x12", _framed(b"\x12", raw[28:] + raw[:28])))
    if case == "no start time":
        span.start_time_unix_nano = 0
    elif case == "long name":
        span.name = "n" * 200
    elif case == "zero trace id":
        span.trace_id = bytes(16)
    return build(Signal.TRACES, (RES, [[span]])).SerializeToString()


@pytest.mark.parametrize("case", ["ids last", "no start time", "long name", "zero trace id"])
def test_spans_off_the_usual_layout_take_the_decoded_path(case: str) -> None:
    value = _off_layout(case)
    record = identify_record(Signal.TRACES, value)
    assert record.wire is None and record.request is not None
    assert record.items.ids == identify(Signal.TRACES, decode_protobuf(Signal.TRACES, value)).ids
    assert record.items.suspect is (case == "zero trace id")


def test_wire_path_rejects_bytes_that_are_not_a_request() -> None:
    with pytest.raises(OtlpDecodeError, match=r"^invalid OTLP/protobuf ExportTraceServiceRequest: malformed "
                       r"wire format \(truncated, or not a protobuf message\)$"):
        identify_record(Signal.TRACES, b"\x0a\x05abc")


def with_corrupt_attribute_length(delta: int) -> bytes:
    """A valid request whose span's last field (an attribute) claims ``delta`` bytes more than it has."""
    attribute = KeyValue(key="http.route", value=AnyValue(string_value="/checkout")).SerializeToString()
    span = spans(7)[0]
    span.attributes.add().ParseFromString(attribute)
    value = request_of([span])
    field = b"\x4a" + encode_varint(len(attribute)) + attribute
    assert value.endswith(field)  # the attribute is the last field of the span and of the request
    return value[:-len(field)] + b"\x4a" + encode_varint(len(attribute) + delta) + attribute


def test_a_corrupt_attribute_length_is_caught_by_the_wire_walk() -> None:
    assert read_spans(with_corrupt_attribute_length(0)) is not None  # intact: the wire path takes it
    value = with_corrupt_attribute_length(3)  # overruns its span: the framing is broken
    assert read_spans(value) is None
    with pytest.raises(OtlpDecodeError, match=MALFORMED):
        identify_record(Signal.TRACES, value)  # the decoded path fails too: the stage dead-letters it


def test_a_batch_reads_like_its_records_one_by_one() -> None:
    values = [samples.traces(n, services=2, seed=n).SerializeToString() for n in (1, 10, 40)]
    values.insert(1, with_corrupt_attribute_length(3))
    values.insert(3, request_of([]))  # no spans at all
    values.append(_off_layout("ids last"))
    assert [f is None for f in read_many(values)] == [False, True, False, False, False, True]
    found = read_many_python(values)  # the batched Python path: one upb parse and numpy pass for all
    assert [f is None for f in found] == [False, True, False, False, False, True]
    for value, wire in zip(values, found, strict=True):
        one = read_many_python([value])[0]
        assert (one is None) == (wire is None)
        if one is not None and wire is not None:
            assert (wire.material, wire.starts, wire.groups) == (one.material, one.starts, one.groups)
            assert wire.rebuild([True] * len(wire), {0}) == one.rebuild([True] * len(one), {0})


def test_identify_records_puts_each_failure_in_its_place() -> None:
    good, other = request_of(spans(1, 2, 3)), _off_layout("ids last")
    found = identify_records(Signal.TRACES, [good, b"\xff\xff not protobuf", other])
    assert isinstance(found[1], OtlpDecodeError)
    with pytest.raises(OtlpDecodeError, match=MALFORMED):
        raise found[1]
    for value, record in ((good, found[0]), (other, found[2])):
        assert not isinstance(record, OtlpDecodeError)
        assert record.items.ids == identify(Signal.TRACES, decode_protobuf(Signal.TRACES, value)).ids
    assert not isinstance(found[0], OtlpDecodeError) and found[0].wire is not None


# --- changelog records -----------------------------------------------------------------------------


def test_changelog_record_round_trip() -> None:
    ids = [bytes([i]) * 16 for i in range(5)]
    groups = [(1234, ids[:2]), (1240, []), (1250, ids[2:])]
    assert decode_changelog(encode_changelog((2, 99), groups)) == ((2, 99), groups)
    assert decode_changelog(encode_changelog((0, -1), [])) == ((0, -1), [])
    assert decode_changelog(b"short") is None and decode_changelog(None) is None
    assert decode_changelog(encode_changelog((1, 0), groups) + b"x") is None
    assert decode_changelog(encode_changelog((1, 0), groups)[:-1]) is None


def test_changelog_records_of_the_previous_format_still_recover() -> None:
    ids = [bytes([i]) * 16 for i in range(3)]
    stale = struct.pack(">qiq", 1234, 2, 99) + b"".join(ids)  # before batching: one time, one offset
    assert decode_changelog(stale) == ((2, 99), [(1234, ids)])


@pytest.mark.parametrize("groups", [0, 1, 2, 3, 4, 8])
def test_new_changelog_records_never_look_like_the_previous_format(groups: int) -> None:
    """The previous release skips a record unless its length is 20 + a multiple of 16: a rollback must
    not misread the new records as identities."""
    value = encode_changelog((0, 0), [(1, [bytes(16)] * g) for g in range(groups)])
    assert (len(value) - 20) % 16 != 0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Any]:
    with seen_store(tmp_path) as opened:
        yield opened


def test_store_recovers_from_changelog_records_and_keeps_its_place(tmp_path: Path) -> None:
    t0 = 2_000_000_000_000
    ids = [bytes([i]) * 16 for i in range(3)]
    stale = struct.pack(">qiq", t0, 1, 3) + ids[2]  # a record of the previous format
    with seen_store(tmp_path) as store:
        assert store.changelog_offset(1) == -1
        read = store.apply_changelog(1, [(4, encode_changelog((1, 7), [(t0, ids[:1]), (t0 + 1, ids[1:2])])),
                                         (5, b"garbage"), (6, stale)])
        assert read == 2
        assert store.lookup(1, [*ids, b"\x09" * 16], t0 + 1) == [True, True, True, False]
        assert store.last_output(1) == (1, 7)
        assert store._parts[1].filters  # the Bloom filter was rebuilt with the recovered identities
    with seen_store(tmp_path) as reopened:  # a restart reads the changelog only past what it holds
        assert reopened.changelog_offset(1) == 6 and reopened.changelog_offset(0) == -1
        assert reopened.lookup(1, ids, t0 + 2) == [True, True, True]
        reopened.set_changelog_offset(1, 5)  # never backwards
        assert reopened.changelog_offset(1) == 6


def test_the_span_loop_and_numpy_agree_on_every_span() -> None:
    """Few spans take a plain loop, many take numpy: both must read and reject exactly the same spans."""
    request = decode_protobuf(Signal.TRACES, samples.traces(60, services=2, seed=9).SerializeToString())
    found = [s.SerializeToString() for rs in request.resource_spans for ss in rs.scope_spans
             for s in ss.spans]
    for case in ("ids last", "no start time", "long name", "zero trace id"):
        view = decode_protobuf(Signal.TRACES, _off_layout(case))
        found.append(view.resource_spans[0].scope_spans[0].spans[0].SerializeToString())
    rng = random.Random(2)
    for span in list(found[:40]):
        at = rng.randrange(len(span))
        found.append(span[:at] + bytes([rng.randrange(256)]) + span[at + 1:])  # one byte changed
    found.append(found[0][:30])  # cut short
    loop, numpy = spanwire._material_loop(found), spanwire._material(found)
    assert loop[2] == numpy[2] and 4 <= sum(loop[2]) < len(found)
    good = [i for i, bad in enumerate(loop[2]) if not bad]
    for i in good:
        assert loop[0][i * 34:(i + 1) * 34] == numpy[0][i * 34:(i + 1) * 34] and loop[1][i] == numpy[1][i]


def test_a_large_batch_is_logged_in_records_under_the_size_limit_and_reads_back_whole() -> None:
    groups = [(1000, [bytes([g, i % 256, i // 256]) * 5 + b"x" for i in range(700)]) for g in range(3)]
    values = changelog_records((2, 41), groups, max_ids=1000)
    assert len(values) == 3 and all(len(v) < 21 + 12 * 2 + 16 * 1000 + 1 for v in values)
    back = [decode_changelog(v) for v in values]
    assert all(found is not None and found[0] == (2, 41) for found in back)
    read = [(stamp, i) for found in back if found for stamp, ids in found[1] for i in ids]
    assert read == [(stamp, i) for stamp, ids in groups for i in ids]
    assert changelog_records((0, 0), []) == [encode_changelog((0, 0), [])]
