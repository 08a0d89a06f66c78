"""The sinks' hand-written wire encoding against protobuf's own, the OTLP views against OTLP, and the
Prometheus series cache against a cold translation, on random input."""

from __future__ import annotations

import math
import struct
from typing import Any

import cramjam
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2 as m

from kotel.otlp import OtlpDecodeError, Signal, decode_protobuf
from kotel.otlp.attributes import kv
from kotel.topology.exporters import PrometheusRemoteWriteConfig
from streams.sinks.http_sinks import PrometheusDeliverer
from streams.sinks.prom_translate import PrometheusTranslator, WireResult
from streams.sinks.prom_translate_series import SampleBatch, SeriesCache
from streams.sinks.proto import otlp_views_pb2 as views
from streams.sinks.proto.remote_write_pb2 import Label, MetricMetadata, Sample, TimeSeries, WriteRequest
from streams.sinks.wire import sample, sample_time, timestamp, varint

INT64 = st.integers(-(2**63), 2**63 - 1)
FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0, 1.0])
TEXT = st.text(max_size=12) | st.sampled_from(["", "é", "a" * 200])


# --- wire pieces ---------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(value=FLOATS, ms=INT64)
def test_a_sample_is_what_protobuf_writes(value: float, ms: int) -> None:
    expected = TimeSeries(samples=[Sample(value=value, timestamp=ms)]).SerializeToString()
    assert sample(value, sample_time(ms)) == expected


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**64 - 1) | INT64)
def test_varint_is_protobufs(n: int) -> None:
    from google.protobuf.internal.encoder import _VarintBytes

    assert varint(n) == _VarintBytes(n & (2**64 - 1))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**62))
def test_timestamp_is_protobufs(time_ns: int) -> None:
    expected = Timestamp(seconds=time_ns // 10**9, nanos=time_ns % 10**9).SerializeToString()
    assert timestamp(time_ns) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(TEXT.filter(bool), TEXT), max_size=8))
def test_label_blocks_are_protobufs(pairs: list[tuple[str, str]]) -> None:
    labels = tuple(pairs)
    expected = TimeSeries(labels=[Label(name=k, value=v) for k, v in labels]).SerializeToString()
    assert SeriesCache(max_entries=4, pair_cache=2).block(labels) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), FLOATS), max_size=20))
def test_a_batch_merges_series_sorts_samples_and_keeps_the_last_of_a_time(
    adds: list[tuple[int, int, float]],
) -> None:
    batch, expected = SampleBatch(), {}
    names = [[Label(name="__name__", value=f"m{i}")] for i in range(4)]
    blocks = [TimeSeries(labels=labels).SerializeToString() for labels in names]
    for series, ms, value in adds:
        batch.add(blocks[series], ms, value)
        expected.setdefault(series, {})[ms] = value
    encoded, counts = batch.encode()
    want = WriteRequest(timeseries=[
        TimeSeries(labels=names[i], samples=[Sample(value=points[ms], timestamp=ms) for ms in sorted(points)])
        for i, points in expected.items()])  # fmt: skip
    assert b"".join(encoded) == want.SerializeToString()
    assert counts == [len(points) for points in expected.values()]


def test_pieces_hold_whole_series_up_to_the_limit() -> None:
    result = WireResult([b"a", b"bb", b"c", b"dd", b"e"], [3, 5, 2, 9, 1], [])
    assert result.pieces(8) == [(b"abb", 8), (b"c", 2), (b"dd", 9), (b"e", 1)]
    assert WireResult([], [], []).pieces(8) == []


# --- views ---------------------------------------------------------------------------------------

VIEWS = [
    (views.MetricsView, "opentelemetry.proto.collector.metrics.v1.ExportMetricsServiceRequest"),
    (views.LogsView, "opentelemetry.proto.collector.logs.v1.ExportLogsServiceRequest"),
]


_STANDS_FOR = {(FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE),
               (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_ENUM)}  # fmt: skip


def _walk(view: Descriptor, real: Descriptor, seen: set[str]) -> list[str]:
    """Fields of a view that disagree with OTLP: number, repetition, and type (bytes may stand for a
    message, int32 for an enum)."""
    if view.full_name in seen:
        return []
    seen.add(view.full_name)
    problems = []
    for fd in view.fields:
        actual = real.fields_by_name.get(fd.name)
        if actual is None or actual.number != fd.number:
            problems.append(f"{view.name}.{fd.name}: no OTLP field of that name and number")
            continue
        if fd.is_repeated != actual.is_repeated:
            problems.append(f"{view.name}.{fd.name}: repetition differs")
        if fd.type == FieldDescriptor.TYPE_MESSAGE and actual.type == FieldDescriptor.TYPE_MESSAGE:
            problems += _walk(fd.message_type, actual.message_type, seen)
        elif fd.type != actual.type and (fd.type, actual.type) not in _STANDS_FOR:
            problems.append(f"{view.name}.{fd.name}: type {fd.type} where OTLP has {actual.type}")
    for oneof in view.oneofs:
        if oneof.name not in real.oneofs_by_name and not oneof.name.startswith("_"):
            problems.append(f"{view.name}: oneof {oneof.name} is not OTLP's")
    return problems


@pytest.mark.parametrize(("view", "real"), VIEWS)
def test_views_match_the_otlp_descriptors(view: Any, real: str) -> None:
    from google.protobuf import descriptor_pool

    assert _walk(view.DESCRIPTOR, descriptor_pool.Default().FindMessageTypeByName(real), set()) == []


# --- the Prometheus series cache -----------------------------------------------------------------

CUMULATIVE = m.AGGREGATION_TEMPORALITY_CUMULATIVE
ATTRS = st.dictionaries(st.sampled_from(["a.b", "a_b", "le", "route", "x"]),
                        st.sampled_from(["", "1", "two", "é"]), max_size=3)  # fmt: skip


@st.composite
def metrics_requests(draw: st.DrawFn) -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    for _ in range(draw(st.integers(1, 3))):
        rm = req.resource_metrics.add()
        rm.resource.attributes.extend(kv(k, v) for k, v in draw(st.dictionaries(
            st.sampled_from(["service.name", "service.instance.id", "host.name"]),
            st.sampled_from(["a", "b"]), max_size=3)).items())  # fmt: skip
        for _ in range(draw(st.integers(1, 2))):
            sm = rm.scope_metrics.add()
            sm.scope.name, sm.scope.version = draw(st.sampled_from([("s", ""), ("s", "1"), ("t", "1")]))
            for _ in range(draw(st.integers(1, 3))):
                metric = sm.metrics.add(name=draw(st.sampled_from(["q", "q.count", "r"])))
                kind = draw(st.sampled_from(["gauge", "sum", "histogram", "summary"]))
                for _ in range(draw(st.integers(1, 3))):
                    attributes = [kv(k, v) for k, v in draw(ATTRS).items()]
                    t = 10**18 + draw(st.integers(0, 2)) * 10**6
                    if kind == "gauge":
                        metric.gauge.data_points.add(time_unix_nano=t, as_double=draw(FLOATS),
                                                     attributes=attributes)  # fmt: skip
                    elif kind == "sum":
                        metric.sum.aggregation_temporality, metric.sum.is_monotonic = CUMULATIVE, True
                        metric.sum.data_points.add(time_unix_nano=t, as_int=draw(st.integers(0, 99)),
                                                   attributes=attributes)  # fmt: skip
                    elif kind == "histogram":
                        metric.histogram.aggregation_temporality = CUMULATIVE
                        bounds = draw(st.sampled_from([[], [1.0], [0.5, 5.0]]))
                        metric.histogram.data_points.add(
                            time_unix_nano=t, explicit_bounds=bounds, count=9, sum=1.5,
                            bucket_counts=[3] * (len(bounds) + 1), attributes=attributes)  # fmt: skip
                    else:
                        point = metric.summary.data_points.add(time_unix_nano=t, count=2, sum=3.0,
                                                               attributes=attributes)  # fmt: skip
                        point.quantile_values.add(quantile=0.5, value=1.0)
    return req


def _config() -> PrometheusRemoteWriteConfig:
    return PrometheusRemoteWriteConfig(endpoint="http://127.0.0.1:9/api/v1/write")


@settings(max_examples=60, deadline=None)
@given(first=metrics_requests(), second=metrics_requests())
def test_a_warm_or_thrashing_cache_translates_like_a_cold_one(first: Any, second: Any) -> None:
    record = second.SerializeToString()
    cold = PrometheusTranslator(_config()).translate_wire(record)
    warm = PrometheusTranslator(_config())
    warm.translate_wire(first.SerializeToString())
    warm.translate_wire(record)
    tiny = PrometheusTranslator(_config(), series_cache_size=1)
    assert warm.translate_wire(record).series == cold.series
    assert tiny.translate_wire(record).series == cold.series
    assert tiny.cache.resets > 0 and len(tiny.cache) <= 1


def test_the_cache_is_bounded_and_counts_its_resets() -> None:
    cache = SeriesCache(max_entries=3)
    points = cache.context("ctx")
    series = [cache.add(points, (bytes([i]),), (("a", str(i)),)) for i in range(3)]
    assert len(cache) == 3 and cache.resets == 0
    cache.named(series[0], "m")
    assert cache.resets == 1 and len(cache) == 1 and points == {}
    with pytest.raises(ValueError, match=r"^max_entries must be at least 1, got 0$"):
        SeriesCache(max_entries=0)


def test_the_sink_posts_what_translate_returns_in_requests_of_bounded_samples() -> None:
    sink = PrometheusDeliverer("p", _config())
    request = ExportMetricsServiceRequest()
    metric = request.resource_metrics.add().scope_metrics.add().metrics.add(name="g")
    for i in range(700):
        metric.gauge.data_points.add(time_unix_nano=10**18, as_double=i, attributes=[kv("i", i)])
    pieces = sink.translate(request)
    assert [weight for _, weight in pieces] == [250, 250, 200]
    body, _ = sink.encode(pieces)
    parsed = WriteRequest.FromString(bytes(cramjam.snappy.decompress_raw(body)))
    assert list(parsed.timeseries) == PrometheusTranslator(_config()).translate(request).series


@pytest.mark.parametrize("send", [True, False])
def test_send_metadata_puts_each_family_in_the_request_once(send: bool) -> None:
    config = PrometheusRemoteWriteConfig(endpoint="http://127.0.0.1:9/api/v1/write", send_metadata=send)
    sink = PrometheusDeliverer("p", config)
    request = ExportMetricsServiceRequest()
    metric = request.resource_metrics.add().scope_metrics.add().metrics.add(name="queue.depth", unit="By",
                                                                           description="items waiting")
    for i in range(600):
        metric.gauge.data_points.add(time_unix_nano=10**18, as_double=i, attributes=[kv("i", i)])
    pieces = sink.translate(request)
    body, _ = sink.encode(pieces)
    parsed = WriteRequest.FromString(bytes(cramjam.snappy.decompress_raw(body)))
    assert len(parsed.timeseries) == 600
    expected = [MetricMetadata(type=MetricMetadata.GAUGE, metric_family_name="queue_depth_bytes",
                               help="items waiting", unit="bytes")]
    assert list(parsed.metadata) == (expected if send else [])


# --- invalid records fail as the full parse does -------------------------------------------------


def _expected_error(signal: Signal, data: bytes) -> str:
    with pytest.raises(OtlpDecodeError) as info:
        decode_protobuf(signal, data)
    return str(info.value)


def test_invalid_utf8_inside_point_attributes_fails_like_decode_protobuf() -> None:
    bad_key = b"\x0a\x02\xff\xfe"  # KeyValue.key (a string) that is not UTF-8
    point = views.NumberDataPointView(attributes=[bad_key], time_unix_nano=1, as_double=1.0)
    data = views.MetricsView(resource_metrics=[views.ResourceMetricsView(scope_metrics=[
        views.ScopeMetricsView(metrics=[views.MetricView(name="g", gauge=views.GaugeView(
            data_points=[point]))])])]).SerializeToString()  # fmt: skip
    message = _expected_error(Signal.METRICS, data)
    assert "UTF-8" in message
    with pytest.raises(OtlpDecodeError) as info:
        PrometheusTranslator(_config()).translate_wire(data)
    assert str(info.value) == message


def test_a_truncated_record_fails_like_decode_protobuf() -> None:
    data = logs_pb2.LogsData().SerializeToString() + b"\x0a\x05ab"
    with pytest.raises(OtlpDecodeError) as info:
        PrometheusTranslator(_config()).translate_wire(data)
    assert str(info.value) == _expected_error(Signal.METRICS, data)


def test_staleness_nan_keeps_its_bits_on_the_wire() -> None:
    stale = struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000002))[0]
    parsed = TimeSeries.FromString(sample(stale, sample_time(5)))
    assert struct.pack("<d", parsed.samples[0].value) == struct.pack("<Q", 0x7FF0000000000002)
    assert math.isnan(parsed.samples[0].value)
