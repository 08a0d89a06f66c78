"""Dedup without a broker: identities, per-item dedup, order, the RocksDB window store, ordered acks.

The wire formats (spans on the wire, changelog records) are tested in test_dedup_wire.py."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValueList
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1.trace_pb2 import Span

import streams.app
from kotel.otlp import Signal, count_items
from streams.app import OrderedAcks
from streams.stages.dedup_core import apply_keep, dedup_request, identify
from streams.stages.dedup_store import BucketFilter
from tests.unit.dedup_support import RES, seen_store, spans
from tests.unit.otlp_builders import build, items, kvs


def traces(*numbers: int, res: dict[str, Any] = RES) -> Any:
    return build(Signal.TRACES, (res, [spans(*numbers)]))


def span_names(request: Any) -> list[int]:
    return [int.from_bytes(s.trace_id, "big") for s in items(Signal.TRACES, request)]


class Seen:
    """The stage's view of the window, as a set; records every remember() call."""

    def __init__(self) -> None:
        self.ids: set[bytes] = set()
        self.remembered: list[bytes] = []

    def seen(self, identity: bytes) -> bool:
        return identity in self.ids

    def remember(self, identity: bytes) -> None:
        self.ids.add(identity)
        self.remembered.append(identity)

    def run(self, signal: Signal, request: Any) -> tuple[Any, int]:
        return dedup_request(signal, request, self.seen, self.remember)


def one_id(signal: Signal, request: Any) -> bytes:
    ids = identify(signal, request).ids
    assert len(ids) == 1
    return ids[0]


# --- identities -------------------------------------------------------------------------------------


def test_span_identity_is_trace_span_and_start_only_and_stable() -> None:
    base = one_id(Signal.TRACES, traces(7))
    other = build(Signal.TRACES, ({"service.name": "elsewhere"}, [spans(7, name="renamed")]))
    other.resource_spans[0].scope_spans[0].spans[0].end_time_unix_nano = 99
    assert one_id(Signal.TRACES, other) == base
    for change in ("trace_id", "span_id", "start_time_unix_nano"):
        changed = traces(7)
        span = changed.resource_spans[0].scope_spans[0].spans[0]
        setattr(span, change, b"\x09" * len(getattr(span, change)) if change != "start_time_unix_nano" else 1)
        assert one_id(Signal.TRACES, changed) != base, change


def test_span_identity_golden_value() -> None:
    """A fixed digest: a changed serialization would silently forget every identity stored so far."""
    request = build(Signal.TRACES, ({}, [[Span(trace_id=bytes(range(16)), span_id=bytes(range(8)),
                                               start_time_unix_nano=1_718_000_000_000_000_000)]]))
    # Two 64-bit lanes (MurmurHash3 and SplitMix64 finalizers chained over the words trace[:8], trace[8:],
    # span id, start time), little endian: computed by hand from dedup_hash's definition.
    assert one_id(Signal.TRACES, request).hex() == "f5a2caac86798a66af38b3c1eac2d703"


def test_odd_id_lengths_do_not_collide() -> None:
    a = build(Signal.TRACES, ({}, [[Span(trace_id=b"\x01" * 15, span_id=b"\x02" * 9)]]))
    b = build(Signal.TRACES, ({}, [[Span(trace_id=b"\x01" * 15 + b"\x02", span_id=b"\x02" * 8)]]))
    assert one_id(Signal.TRACES, a) != one_id(Signal.TRACES, b)


def _log(**fields: Any) -> LogRecord:
    record = LogRecord(time_unix_nano=10, observed_time_unix_nano=11, severity_number=9, severity_text="INFO",
                       trace_id=b"\x01" * 16, span_id=b"\x02" * 8, body=AnyValue(string_value="hello"),
                       attributes=kvs({"a": 1, "b": "x"}))
    for name, value in fields.items():
        if name == "body":
            record.body.CopyFrom(value)
        elif name == "attributes":
            del record.attributes[:]
            record.attributes.extend(value)
        else:
            setattr(record, name, value)
    return record


def logs(record: LogRecord, res: dict[str, Any] = RES, scope: str = "scope-0") -> Any:
    request = build(Signal.LOGS, (res, [[record]]))
    request.resource_logs[0].scope_logs[0].scope.name = scope
    return request


def test_log_identity_ignores_attribute_order_everywhere() -> None:
    base = one_id(Signal.LOGS, logs(_log()))
    reordered = _log(attributes=kvs({"b": "x", "a": 1}))
    res = dict(reversed(list(RES.items())))
    assert one_id(Signal.LOGS, logs(reordered, res=res)) == base
    nested = KeyValueList(values=kvs({"k1": 1, "k2": 2}))
    nested_reversed = KeyValueList(values=kvs({"k2": 2, "k1": 1}))
    assert (one_id(Signal.LOGS, logs(_log(body=AnyValue(kvlist_value=nested))))
            == one_id(Signal.LOGS, logs(_log(body=AnyValue(kvlist_value=nested_reversed)))))


@pytest.mark.parametrize("change", [
    {"time_unix_nano": 12}, {"observed_time_unix_nano": 12}, {"severity_number": 17},
    {"severity_text": "ERROR"}, {"body": AnyValue(string_value="bye")}, {"trace_id": b"\x03" * 16},
    {"span_id": b"\x03" * 8}, {"attributes": kvs({"a": 2, "b": "x"})}, {"attributes": kvs({"a": 1})},
])
def test_log_identity_covers_every_listed_field(change: dict[str, Any]) -> None:
    assert one_id(Signal.LOGS, logs(_log(**change))) != one_id(Signal.LOGS, logs(_log()))


def test_log_identity_covers_resource_and_scope() -> None:
    base = one_id(Signal.LOGS, logs(_log()))
    assert one_id(Signal.LOGS, logs(_log(), res={**RES, "host": "b"})) != base
    assert one_id(Signal.LOGS, logs(_log(), scope="other")) != base


def _gauge(name: str = "m", attrs: dict[str, Any] | None = None, start: int = 1, time: int = 2,
           value: int = 5) -> metrics_pb2.Metric:
    metric = metrics_pb2.Metric(name=name)
    metric.gauge.data_points.add(start_time_unix_nano=start, time_unix_nano=time, as_int=value,
                                 attributes=kvs(attrs if attrs is not None else {"x": 1, "y": 2}))
    return metric


def metrics(*metric_list: metrics_pb2.Metric, res: dict[str, Any] = RES) -> Any:
    return build(Signal.METRICS, (res, [list(metric_list)]))


def test_metric_point_identity() -> None:
    base = one_id(Signal.METRICS, metrics(_gauge()))
    assert one_id(Signal.METRICS, metrics(_gauge(attrs={"y": 2, "x": 1}))) == base
    assert one_id(Signal.METRICS, metrics(_gauge(value=6))) == base  # a retried point, not a new one
    for changed in (metrics(_gauge(name="n")), metrics(_gauge(attrs={"x": 1})), metrics(_gauge(start=9)),
                    metrics(_gauge(time=9)), metrics(_gauge(), res={"service.name": "other"})):
        assert one_id(Signal.METRICS, changed) != base


# --- dedup_request ----------------------------------------------------------------------------------


def test_exact_duplicate_record_is_dropped_whole() -> None:
    seen = Seen()
    first, dups = seen.run(Signal.TRACES, traces(1, 2, 3))
    assert dups == 0 and span_names(first) == [1, 2, 3]
    again, dups = seen.run(Signal.TRACES, traces(1, 2, 3))
    assert again is None and dups == 3
    assert len(seen.remembered) == 3


def test_partial_overlap_keeps_exactly_the_new_items_across_records() -> None:
    seen = Seen()
    seen.run(Signal.TRACES, traces(1, 2, 3, 4))
    out, dups = seen.run(Signal.TRACES, traces(3, 4, 5, 6))
    assert span_names(out) == [5, 6] and dups == 2
    out, dups = seen.run(Signal.TRACES, build(Signal.TRACES, (RES, [spans(6, 7)]), (RES, [spans(1, 8)])))
    assert [span_names(build(Signal.TRACES, (RES, [list(s.spans)]))) for r in out.resource_spans
            for s in r.scope_spans] == [[7], [8]]
    assert dups == 2


def test_duplicates_inside_one_request_are_kept_once() -> None:
    seen = Seen()
    out, dups = seen.run(Signal.TRACES, build(Signal.TRACES, (RES, [spans(1, 2), spans(2, 1, 3)])))
    assert span_names(out) == [1, 2, 3] and dups == 2
    assert len(seen.remembered) == 3


def test_new_and_ordered_request_is_passed_through_untouched() -> None:
    request = traces(1, 2, 3)
    out, _ = Seen().run(Signal.TRACES, request)
    assert out is request


def test_items_of_each_scope_are_sorted_by_time() -> None:
    numbers = list(range(50))
    random.Random(3).shuffle(numbers)
    out, _ = Seen().run(Signal.TRACES, build(Signal.TRACES, (RES, [spans(*numbers), spans(99, 60)])))
    scopes = out.resource_spans[0].scope_spans
    assert [s.start_time_unix_nano for s in scopes[0].spans] == [1000 + n for n in range(50)]
    assert [s.start_time_unix_nano for s in scopes[1].spans] == [1060, 1099]


def test_logs_sort_by_time_or_observed_time() -> None:
    records = [_log(time_unix_nano=30), _log(time_unix_nano=0, observed_time_unix_nano=20),
               _log(time_unix_nano=10)]
    out, _ = Seen().run(Signal.LOGS, build(Signal.LOGS, (RES, [records])))
    got = [(r.time_unix_nano, r.observed_time_unix_nano)
           for r in out.resource_logs[0].scope_logs[0].log_records]
    assert got == [(10, 11), (0, 20), (30, 11)]


def test_metrics_points_dedup_sort_and_prune() -> None:
    seen = Seen()
    old = _gauge(name="old")
    seen.run(Signal.METRICS, metrics(old, _gauge(name="shared", time=2)))
    shared = _gauge(name="shared", time=2)
    shared.gauge.data_points.add(time_unix_nano=1, attributes=kvs({"x": 1}))  # new, earlier
    out, dups = seen.run(Signal.METRICS, metrics(_gauge(name="old"), shared))
    assert dups == 2
    kept = out.resource_metrics[0].scope_metrics[0].metrics
    assert [m.name for m in kept] == ["shared"]  # "old" lost its only point and is pruned
    assert [p.time_unix_nano for p in kept[0].gauge.data_points] == [1]


def test_every_metric_kind_counts_its_points() -> None:
    hist = metrics_pb2.Metric(name="h")
    hist.histogram.data_points.add(time_unix_nano=1, count=1)
    expo = metrics_pb2.Metric(name="e")
    expo.exponential_histogram.data_points.add(time_unix_nano=1, count=1)
    summary = metrics_pb2.Metric(name="s")
    summary.summary.data_points.add(time_unix_nano=1, count=1)
    request = metrics(hist, expo, summary, metrics_pb2.Metric(name="empty"))
    assert len(identify(Signal.METRICS, request).ids) == 3
    seen = Seen()
    seen.run(Signal.METRICS, metrics(expo))
    out, dups = seen.run(Signal.METRICS, request)
    assert dups == 1 and count_items(out) == 2
    assert [m.name for m in out.resource_metrics[0].scope_metrics[0].metrics] == ["h", "s"]


def test_fully_duplicate_resources_and_scopes_are_pruned() -> None:
    seen = Seen()
    seen.run(Signal.TRACES, traces(1))
    request = build(Signal.TRACES, (RES, [spans(1)]), ({"service.name": "b"}, [spans(1), spans(2)]))
    out, _ = seen.run(Signal.TRACES, request)
    assert len(out.resource_spans) == 1 and len(out.resource_spans[0].scope_spans) == 1
    assert span_names(out) == [2]


def test_apply_keep_checks_the_flag_count() -> None:
    with pytest.raises(ValueError, match=r"^keep has 2 flags but the request has 3 items$"):
        apply_keep(Signal.TRACES, traces(1, 2, 3), [True, False])


# --- the RocksDB window store and its Bloom filters ---------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Any]:
    with seen_store(tmp_path) as opened:
        yield opened


def test_store_window_is_exact_and_old_buckets_are_dropped(store: Any) -> None:
    ids = [bytes([i]) * 16 for i in range(4)]
    t0 = 1_000_000_000_000
    store.remember(0, ids[:2], t0, (0, 5))
    assert store.lookup(0, ids, t0 + 10_000) == [True, True, False, False]
    assert store.lookup(1, ids, t0 + 1) == [False] * 4  # partitions do not share state
    assert store.lookup(0, ids, t0 + 10_001) == [False] * 4  # one ms past the window
    assert store.last_output(0) == (0, 5)
    store.lookup(0, ids, t0 + 30_000)
    assert not store._parts[0].buckets  # the bucket fell out: dropped with its files


class CountingBucket:
    """A bucket's column family that counts the identities asked of RocksDB."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.asked = inner, 0

    def get(self, keys: list[bytes]) -> Any:
        self.asked += len(keys)
        return self.inner.get(keys)


def test_lookup_batch_judges_each_record_at_its_own_stream_time(store: Any) -> None:
    a, b = bytes([1]) * 16, bytes([2]) * 16
    t0 = 1_000_000_009_000
    store.remember(0, [a], t0, None)
    # Record 0 at t0 + 9999 sees a within the window; record 1 at t0 + 25000 moves stream time past it.
    assert store.lookup_batch(0, [a, a, b], [1, 3], [t0 + 9_999, t0 + 25_000]) == [True, False, False]
    assert store.lookup(0, [a], t0 + 25_000) == [False]


def test_bloom_filters_keep_misses_away_from_rocksdb_without_false_negatives(store: Any) -> None:
    rng = random.Random(3)
    stored = [rng.randbytes(16) for _ in range(5000)]
    absent = [rng.randbytes(16) for _ in range(5000)]
    t0 = 1_000_000_000_000
    store.remember(0, stored, t0, None)
    part = store._parts[0]
    (index,) = part.buckets
    counting = part.buckets[index] = CountingBucket(part.buckets[index])
    assert store.lookup(0, absent, t0 + 1) == [False] * 5000
    assert counting.asked < 100  # ~1 % false positives reach RocksDB
    assert store.lookup(0, stored, t0 + 1) == [True] * 5000


def test_bloom_filter_memory_is_bounded_and_a_bucket_past_it_is_unfiltered(tmp_path: Path) -> None:
    filt, budget = BucketFilter(), [800 << 10]
    words = np.frombuffer(random.Random(4).randbytes(16 * 300_000), "<u8").reshape(-1, 2)
    assert filt.add(words[:190_000], budget)
    assert filt.maybe(words[:190_000]).all() and filt.maybe(words[190_000:]).mean() < 0.03
    assert len(filt.layers) == 2 and budget[0] == (800 - 384) << 10  # 64k + 128k identities in 384 KiB
    assert not filt.add(words[190_000:], budget)  # a third layer (512 KiB) would pass the budget
    with seen_store(tmp_path) as store:
        store._budget[0] = 1000  # less than one layer: every bucket is unfiltered
        rng = random.Random(5)
        ids = [rng.randbytes(16) for _ in range(101)]
        store.remember(0, ids[:100], 1_000_000_000_000, None)
        assert store.lookup(0, ids, 1_000_000_000_001) == [True] * 100 + [False]
        assert not store._parts[0].filters


# --- ordered acks ------------------------------------------------------------------------------------


class FakeStream:
    def __init__(self) -> None:
        self.acked: list[str] = []

    async def ack(self, event: str) -> bool:
        self.acked.append(event)
        return True


async def test_events_are_acked_in_order_only_after_their_outputs() -> None:
    stream, delivered = FakeStream(), []
    loop = asyncio.get_running_loop()

    async def on_delivered(group: list[Any]) -> None:
        delivered.append([p.event for p in group])

    acks = OrderedAcks(stream, on_delivered, max_in_flight=8)  # type: ignore[arg-type]
    first, second = loop.create_future(), loop.create_future()
    await acks.submit("e1", [first])
    await acks.submit("e2", [second])
    await acks.submit("e3", [])
    second.set_result(None)
    await asyncio.sleep(0.05)
    assert stream.acked == []  # e2 is done but e1 is not: nothing may be acked yet
    first.set_result(None)
    await asyncio.wait_for(acks.drained(), 1)
    assert stream.acked == ["e1", "e2", "e3"]
    assert delivered == [["e1", "e2", "e3"]]


async def test_a_failed_output_ends_the_worker_without_acking(monkeypatch: pytest.MonkeyPatch) -> None:
    stream, ended = FakeStream(), []
    monkeypatch.setattr(streams.app, "fatal", lambda message, exc=None: ended.append(repr(exc)))
    acks = OrderedAcks(stream, None, max_in_flight=8)  # type: ignore[arg-type]
    failed = asyncio.get_running_loop().create_future()
    await acks.submit("e1", [failed])
    failed.set_exception(RuntimeError("broker said no"))
    await asyncio.sleep(0.05)
    assert stream.acked == [] and ended == ["RuntimeError('broker said no')"]



async def test_a_batch_is_acked_after_its_state_without_holding_up_the_next() -> None:
    stream, calls = FakeStream(), []
    loop = asyncio.get_running_loop()
    states = [loop.create_future(), loop.create_future()]

    async def on_delivered(group: list[Any]) -> list[Any]:
        calls.append([(p.earlier, p.event, p.payload) for p in group])
        return [states[len(calls) - 1]]

    acks = OrderedAcks(stream, on_delivered, max_in_flight=8)  # type: ignore[arg-type]
    first, second = loop.create_future(), loop.create_future()
    await acks.submit_many(["e1", "e2", "e3"], [first], "batch-1")
    first.set_result(None)
    await asyncio.sleep(0.05)
    await acks.submit_many(["e4"], [second], "batch-2")
    second.set_result(None)
    await asyncio.sleep(0.05)
    assert calls == [[(("e1", "e2"), "e3", "batch-1")], [((), "e4", "batch-2")]]  # not held up
    assert stream.acked == [] and len(acks) == 4  # neither batch's state is acknowledged yet
    states[1].set_result(None)
    await asyncio.sleep(0.05)
    assert stream.acked == []  # in order: batch 1 first
    states[0].set_result(None)
    await asyncio.wait_for(acks.drained(), 1)
    assert stream.acked == ["e1", "e2", "e3", "e4"] and len(acks) == 0


async def test_record_values_in_flight_are_bounded_by_bytes() -> None:
    """A backlog of large records must not all sit in memory waiting for their acks."""

    class Event:
        def __init__(self, name: str, size: int) -> None:
            self.name, self.message = name, type("M", (), {"value": b"x" * size})()

    stream = FakeStream()
    acks = OrderedAcks(stream, None, max_in_flight=100, max_bytes=1000)  # type: ignore[arg-type]
    output = asyncio.get_running_loop().create_future()
    await acks.submit(Event("a", 600), [output])  # type: ignore[arg-type]
    second = asyncio.ensure_future(acks.submit(Event("b", 600), []))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert not second.done()  # 1200 bytes would be over the bound: it waits for the first ack
    output.set_result(None)
    await asyncio.wait_for(second, 1)
    await asyncio.wait_for(acks.drained(), 1)
    assert [e.name for e in stream.acked] == ["a", "b"]  # type: ignore[attr-defined]
