"""The C span reader (kotel/otlp/_spanscan.c) against the Python one it replaces on the hot path."""

from __future__ import annotations

import random

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans, Span

from kotel.otlp import Signal, decode_protobuf, samples, spanwire
from kotel.otlp.spanwire import ScannedSpans, WireSpans, read_many_python
from tests.unit.dedup_support import RES, spans
from tests.unit.otlp_builders import build

native = pytest.mark.skipif(spanwire._spanscan is None, reason="checked by test_the_native_reader_is_built")


def test_the_native_reader_is_built() -> None:
    """`make setup` builds it (gcc is part of the machine); without it the dedup stage runs ~25 % dearer."""
    assert spanwire._spanscan is not None


def _python(value: bytes) -> WireSpans | None:
    return read_many_python([value])[0]


def _native(value: bytes) -> ScannedSpans | None:
    found = spanwire.read_many([value])[0]
    assert found is None or isinstance(found, ScannedSpans)
    return found


def _agree(value: bytes) -> tuple[WireSpans, ScannedSpans] | None:
    """Both refuse, or both read the same material, span count and unordered scopes."""
    reference, scanned = _python(value), _native(value)
    assert (reference is None) == (scanned is None)
    if reference is None or scanned is None:
        return None
    assert scanned.material == reference.material
    assert len(scanned) == len(reference)
    assert scanned.unordered_groups() == reference.unordered_groups()
    return reference, scanned


def _requests() -> list[bytes]:
    values = [samples.traces(n, services=s, seed=n * 7 + s).SerializeToString()
              for n in (1, 2, 17, 300) for s in (1, 3)]
    empty_scope = build(Signal.TRACES, (RES, [spans(3)])).SerializeToString()
    request = decode_protobuf(Signal.TRACES, empty_scope)
    request.resource_spans[0].scope_spans.append(ScopeSpans())  # a scope without spans is kept
    request.resource_spans[0].schema_url = "https://example.com/schema"
    no_spans = build(Signal.TRACES, (RES, [[]])).SerializeToString()
    values += [empty_scope, request.SerializeToString(), no_spans, b""]
    return values


@native
@pytest.mark.parametrize("index", range(12))
def test_native_reads_and_rebuilds_like_the_python_reader(index: int) -> None:
    value = _requests()[index]
    both = _agree(value)
    assert both is not None
    reference, scanned = both
    rnd = random.Random(index)
    for share in (1.0, 0.7, 0.2, 0.0):
        keep = [rnd.random() < share for _ in range(len(reference))]
        for sort in (reference.unordered_groups(), set()):
            fresh = _python(value)  # WireSpans.rebuild edits its view: one rebuild per reading
            assert fresh is not None
            expected, found = fresh.rebuild(keep, sort), scanned.rebuild(keep, sort)
            assert (expected is None) == (found is None)
            if expected is not None and found is not None:  # field order may differ: compare messages
                assert decode_protobuf(Signal.TRACES, found) == decode_protobuf(Signal.TRACES, expected)


@native
def test_native_sorts_each_scope_stably_by_start_time() -> None:
    found = spans(1, 2, 3, 4, 5, 6)  # equal start times keep their order: told apart by their ids
    for span, start in zip(found, (50, 10, 50, 30, 10, 40), strict=True):
        span.start_time_unix_nano = start
    value = build(Signal.TRACES, (RES, [found])).SerializeToString()
    scanned = _native(value)
    assert scanned is not None and scanned.unordered_groups() == {0}
    out = scanned.rebuild([True] * 6, {0})
    assert out is not None
    kept = decode_protobuf(Signal.TRACES, out).resource_spans[0].scope_spans[0].spans
    expected = sorted(found, key=lambda s: s.start_time_unix_nano)  # sorted() is stable
    assert [s.SerializeToString() for s in kept] == [s.SerializeToString() for s in expected]


@native
def test_native_refuses_what_the_python_reader_refuses() -> None:
    value = samples.traces(40, services=2, seed=3).SerializeToString()
    for cut in range(len(value)):  # every truncation
        _agree(value[:cut])
    off = spans(1)[0]
    off.trace_id = bytes(16)  # all-zero ids: the decoded path flags them
    _agree(build(Signal.TRACES, (RES, [[off]])).SerializeToString())
    raw = Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="n" * 200, start_time_unix_nano=5)
    _agree(build(Signal.TRACES, (RES, [[raw]])).SerializeToString())  # a long name before the start time
    _agree(b"\x0a\x05abc")


@native
def test_native_never_accepts_a_mutated_record_the_python_reader_refuses() -> None:
    """Random single-byte changes: where both read it they agree; the C reader may refuse more only when
    the change made a group field (wire types 3 and 4), which upb skips and OTLP never writes."""
    value = samples.traces(30, services=2, seed=11).SerializeToString()
    rnd = random.Random(5)
    for _ in range(3000):
        at, byte = rnd.randrange(len(value)), rnd.randrange(256)
        mutated = value[:at] + bytes([byte]) + value[at + 1:]
        reference, scanned = _python(mutated), _native(mutated)
        if scanned is not None:
            assert reference is not None and scanned.material == reference.material
            assert scanned.unordered_groups() == reference.unordered_groups()
        elif reference is not None:
            assert byte & 7 in (3, 4), f"byte {at} set to {byte:#x}: refused by C only"


@native
def test_native_rebuild_refuses_flags_that_do_not_fit_the_record() -> None:
    value = samples.traces(5, services=1, seed=1).SerializeToString()
    scanned = _native(value)
    assert scanned is not None
    with pytest.raises(ValueError, match="flags do not match"):
        spanwire._spanscan.rebuild(value, bytes(len(scanned) - 1), bytes(scanned.scopes))  # type: ignore[union-attr]
