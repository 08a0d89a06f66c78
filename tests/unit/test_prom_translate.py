"""OTLP metrics -> Prometheus remote write: every translation rule with exact series, labels and values."""

from __future__ import annotations

import math
import struct
from typing import Any

import cramjam
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValueList
from opentelemetry.proto.metrics.v1 import metrics_pb2 as m

from kotel.otlp.attributes import kv
from kotel.topology.exporters import PrometheusRemoteWriteConfig
from streams.sinks.prom_translate import (
    STALE_NAN,
    PrometheusTranslator,
    TranslateResult,
    classify_prometheus_response,
    encode_write_request,
    remote_write_headers,
)
from streams.sinks.prom_translate_delta import DeltaAccumulator
from streams.sinks.prom_translate_names import Kind, attribute_text, format_float, label_name, metric_name
from streams.sinks.proto.remote_write_pb2 import MetricMetadata, WriteRequest

SERVICE = {"service.name": "api", "service.namespace": "shop", "service.instance.id": "i-1"}
BASE = {"instance": "i-1", "job": "shop/api", "otel_scope_name": "lib", "otel_scope_version": "1.2"}
T = 1_700_000_000_123_456_789  # ns; 1700000000123 ms
CUMULATIVE, DELTA = m.AGGREGATION_TEMPORALITY_CUMULATIVE, m.AGGREGATION_TEMPORALITY_DELTA


def config(**options: Any) -> PrometheusRemoteWriteConfig:
    return PrometheusRemoteWriteConfig(endpoint="http://127.0.0.1:9090/api/v1/write", **options)


def request(*metrics: m.Metric, resource: dict[str, Any] | None = None,
            scope: tuple[str, str] = ("lib", "1.2")) -> ExportMetricsServiceRequest:  # fmt: skip
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.extend(kv(k, v) for k, v in (SERVICE if resource is None else resource).items())
    sm = rm.scope_metrics.add()
    sm.scope.name, sm.scope.version = scope
    sm.metrics.extend(metrics)
    return req


def gauge(name: str = "queue.size", unit: str = "", value: float | int = 3, t: int = T, flags: int = 0,
          **attrs: Any) -> m.Metric:  # fmt: skip
    metric = m.Metric(name=name, unit=unit)
    point = metric.gauge.data_points.add(time_unix_nano=t, flags=flags,
                                         attributes=[kv(k, v) for k, v in attrs.items()])  # fmt: skip
    if isinstance(value, int):
        point.as_int = value
    else:
        point.as_double = value
    return metric


def total(name: str = "http.requests", value: float = 5.0, temporality: int = CUMULATIVE,
          monotonic: bool = True, start: int = 0, t: int = T, flags: int = 0,
          **attrs: Any) -> m.Metric:  # fmt: skip
    metric = m.Metric(name=name, unit="{request}")
    metric.sum.aggregation_temporality, metric.sum.is_monotonic = temporality, monotonic
    metric.sum.data_points.add(as_double=value, start_time_unix_nano=start, time_unix_nano=t, flags=flags,
                               attributes=[kv(k, v) for k, v in attrs.items()])  # fmt: skip
    return metric


def histogram(bounds: list[float], counts: list[int], total_sum: float | None = 12.5,
              temporality: int = CUMULATIVE, start: int = 0, t: int = T,
              flags: int = 0) -> m.Metric:  # fmt: skip
    metric = m.Metric(name="http.server.duration", unit="s")
    metric.histogram.aggregation_temporality = temporality
    point = metric.histogram.data_points.add(
        explicit_bounds=bounds, bucket_counts=counts, count=sum(counts), start_time_unix_nano=start,
        time_unix_nano=t, flags=flags)  # fmt: skip
    if total_sum is not None:
        point.sum = total_sum
    return metric


def rows(result: TranslateResult) -> dict[str, list[tuple[float, int]]]:
    """Each series as 'name{label="value",...}' (labels in their wire order) -> [(value, ms)]."""
    out = {}
    for ts in result.series:
        names = [label.name for label in ts.labels]
        assert names == sorted(names) and len(set(names)) == len(names)
        labels = {label.name: label.value for label in ts.labels}
        name = labels.pop("__name__")
        body = ",".join(f'{k}="{v}"' for k, v in labels.items())
        out[f"{name}{{{body}}}"] = [(s.value, s.timestamp) for s in ts.samples]
    return out


def key(name: str, base: dict[str, str] = BASE, **labels: str) -> str:
    """How `rows` renders a series: base labels plus these, sorted by name."""
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted({**base, **labels}.items())) + "}"


def translate(*metrics: m.Metric, cfg: PrometheusRemoteWriteConfig | None = None,
              **kw: Any) -> TranslateResult:  # fmt: skip
    translator = PrometheusTranslator(cfg or config(target_info={"enabled": False}))
    return translator.translate(request(*metrics, **kw))


def bits(value: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", value))[0]


# --- types ---------------------------------------------------------------------------------------


def test_gauge_keeps_value_time_in_ms_and_sorted_labels() -> None:
    result = translate(gauge("queue.size", "{item}", 3, **{"Zone": "a", "b.c": "x"}))
    assert rows(result) == {key("queue_size", Zone="a", b_c="x"): [(3.0, 1_700_000_000_123)]}
    assert next(iter(rows(result))).startswith('queue_size{Zone="a",b_c="x",instance=')  # upper case first
    assert result.dropped == {}


def test_gauge_of_unit_one_gets_ratio_but_a_counter_does_not() -> None:
    assert list(rows(translate(gauge("cpu.utilization", "1", 0.5)))) == [key("cpu_utilization_ratio")]
    counter = total("cpu.utilization")
    counter.unit = "1"
    assert list(rows(translate(counter))) == [key("cpu_utilization_total")]


def test_monotonic_cumulative_sum_is_a_total_with_its_exemplars() -> None:
    metric = total("http.requests", 7.0, method="GET")
    metric.sum.data_points[0].exemplars.add(
        as_double=1.0, time_unix_nano=T, trace_id=b"\x01" * 16, span_id=b"\x02" * 8,
        filtered_attributes=[kv("user", "u1")])  # fmt: skip
    result = translate(metric)
    assert rows(result) == {key("http_requests_total", method="GET"): [(7.0, 1_700_000_000_123)]}
    (exemplar,) = result.series[0].exemplars
    labels = {lb.name: lb.value for lb in exemplar.labels}
    assert labels == {"span_id": "02" * 8, "trace_id": "01" * 16, "user": "u1"}
    assert (exemplar.value, exemplar.timestamp) == (1.0, 1_700_000_000_123)


def test_non_monotonic_sum_is_a_gauge() -> None:
    assert rows(translate(total("pool.in_use", -2.0, monotonic=False))) == {
        key("pool_in_use"): [(-2.0, 1_700_000_000_123)]}  # fmt: skip


def test_histogram_becomes_cumulative_buckets_sum_and_count() -> None:
    result = translate(histogram([0.005, 1, 100], [1, 2, 3, 4]))
    ms = 1_700_000_000_123
    assert rows(result) == {
        key("http_server_duration_seconds_bucket", le="0.005"): [(1.0, ms)],
        key("http_server_duration_seconds_bucket", le="1"): [(3.0, ms)],
        key("http_server_duration_seconds_bucket", le="100"): [(6.0, ms)],
        key("http_server_duration_seconds_bucket", le="+Inf"): [(10.0, ms)],
        key("http_server_duration_seconds_sum"): [(12.5, ms)],
        key("http_server_duration_seconds_count"): [(10.0, ms)],
    }


def test_le_and_quantile_labels_override_attributes_of_that_name() -> None:
    metric = histogram([1], [1, 1])
    metric.histogram.data_points[0].attributes.append(kv("le", "attr"))
    name = "http_server_duration_seconds"
    assert sorted(rows(translate(metric))) == sorted([
        key(f"{name}_bucket", le="1"), key(f"{name}_bucket", le="+Inf"), key(f"{name}_sum", le="attr"),
        key(f"{name}_count", le="attr")])  # fmt: skip


def test_histogram_without_sum_has_no_sum_series() -> None:
    names = list(rows(translate(histogram([1], [1, 1], total_sum=None))))
    assert [n.split("{")[0] for n in names] == ["http_server_duration_seconds_bucket"] * 2 + [
        "http_server_duration_seconds_count"]  # fmt: skip


def test_summary_has_quantile_labels_sum_and_count() -> None:
    metric = m.Metric(name="rpc.latency", unit="ms")
    point = metric.summary.data_points.add(time_unix_nano=T, count=4, sum=10.0)
    point.quantile_values.add(quantile=0.5, value=2.0)
    point.quantile_values.add(quantile=0.99, value=4.5)
    ms = 1_700_000_000_123
    assert rows(translate(metric)) == {
        key("rpc_latency_milliseconds", quantile="0.5"): [(2.0, ms)],
        key("rpc_latency_milliseconds", quantile="0.99"): [(4.5, ms)],
        key("rpc_latency_milliseconds_sum"): [(10.0, ms)],
        key("rpc_latency_milliseconds_count"): [(4.0, ms)],
    }


def exponential(scale: int, offset: int, counts: list[int], zero: int = 0,
                negative: tuple[int, list[int]] = (0, []), temporality: int = CUMULATIVE, start: int = 0,
                t: int = T) -> m.Metric:  # fmt: skip
    metric = m.Metric(name="req.latency", unit="s")
    metric.exponential_histogram.aggregation_temporality = temporality
    point = metric.exponential_histogram.data_points.add(
        scale=scale, zero_count=zero, count=sum(counts) + zero + sum(negative[1]), sum=3.0,
        start_time_unix_nano=start, time_unix_nano=t)  # fmt: skip
    point.positive.offset, point.negative.offset = offset, negative[0]
    point.positive.bucket_counts.extend(counts)
    point.negative.bucket_counts.extend(negative[1])
    return metric


def buckets(result: TranslateResult) -> dict[str, float]:
    return {k.split('le="')[1].split('"')[0]: v[0][0] for k, v in rows(result).items() if "_bucket" in k}


def test_exponential_histogram_becomes_power_of_two_buckets() -> None:
    # scale 2: indexes -3..1 cover (2**-0.75, 2**0.5]; at scale 0 they fall in (0.5, 1] and (1, 2].
    result = translate(exponential(2, -3, [1, 2, 3, 0, 1], zero=1, negative=(0, [2])))
    assert buckets(result) == {"-1": 2.0, "0": 3.0, "1": 9.0, "2": 10.0, "+Inf": 10.0}
    assert rows(result)[key("req_latency_seconds_count")] == [(10.0, 1_700_000_000_123)]


def test_exponential_histogram_of_negative_scale_keeps_its_bounds() -> None:
    # scale -1: base 4, index 1 covers (4, 16], index 2 covers (16, 64].
    assert buckets(translate(exponential(-1, 1, [5, 6]))) == {"16": 5.0, "64": 11.0, "+Inf": 11.0}
    # scale -3: base 256, index 127 covers (2**1016, 2**1024]: no finite bound above it, only +Inf
    assert buckets(translate(exponential(-3, 127, [1]))) == {"+Inf": 1.0}


# --- labels --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("resource", "expected"), [
    ({"service.name": "api", "service.namespace": "shop", "service.instance.id": "i-1"},
     'instance="i-1",job="shop/api"'),
    ({"service.name": "api", "service.instance.id": "i-1"}, 'instance="i-1",job="api"'),
    ({"service.namespace": "shop"}, ""),
])  # fmt: skip
def test_job_and_instance_come_from_the_service_attributes(resource: dict[str, str], expected: str) -> None:
    (name,) = rows(translate(gauge(), resource=resource, scope=("", "")))
    assert name == f"queue_size{{{expected}}}"


def test_target_info_carries_the_other_resource_attributes() -> None:
    res = {**SERVICE, "host.name": "h1", "k8s.pod.uid": "p"}
    result = PrometheusTranslator(config()).translate(request(gauge(), gauge("b", t=T + 10**9), resource=res))
    assert rows(result)['target_info{host_name="h1",instance="i-1",job="shop/api",k8s_pod_uid="p"}'] == [
        (1.0, 1_700_000_001_123)]  # fmt: skip
    assert not any("host_name" in k for k in rows(result) if not k.startswith("target_info"))
    named = PrometheusTranslator(config(namespace="kotel")).translate(request(gauge(), resource=res))
    assert any(k.startswith("kotel_target_info{") for k in rows(named))


def test_target_info_is_left_out_when_disabled_or_empty() -> None:
    res = {**SERVICE, "host.name": "h1"}
    assert not any(k.startswith("target_info") for k in rows(translate(gauge(), resource=res)))
    only_service = PrometheusTranslator(config()).translate(request(gauge()))
    assert not any(k.startswith("target_info") for k in rows(only_service))


def test_resource_to_telemetry_copies_resource_attributes_but_point_attributes_win() -> None:
    cfg = config(resource_to_telemetry_conversion={"enabled": True}, target_info={"enabled": False})
    resource = {**SERVICE, "region": "res", "host.name": "h1"}
    result = translate(gauge(region="point"), cfg=cfg, resource=resource)
    assert list(rows(result)) == [key("queue_size", host_name="h1", region="point", service_instance_id="i-1",
                                      service_name="api", service_namespace="shop")]  # fmt: skip


def test_scope_labels_leave_out_an_empty_version() -> None:
    assert list(rows(translate(gauge(), scope=("io.lib", "")))) == [
        'queue_size{instance="i-1",job="shop/api",otel_scope_name="io.lib"}']  # fmt: skip


def test_label_names_are_sanitised_merged_with_semicolons_and_empty_values_dropped() -> None:
    result = translate(gauge(**{"a_b": "2", "a.b": "1", "2fa": "on", "_x": "y", "empty": "", "ok": True}))
    assert list(rows(result)) == [key("queue_size", a_b="1;2", key_2fa="on", key_x="y", ok="true")]


def test_external_labels_fill_free_names_only() -> None:
    cfg = config(external_labels={"cluster": "c1", "job": "other"}, target_info={"enabled": False})
    assert list(rows(translate(gauge(), cfg=cfg))) == [key("queue_size", cluster="c1")]


def test_namespace_and_disabled_suffixes() -> None:
    cfg = config(namespace="kotel", add_metric_suffixes=False, target_info={"enabled": False})
    result = translate(total("http.requests"), histogram([1], [1, 0]), cfg=cfg)
    assert sorted(k.split("{")[0] for k in rows(result)) == [
        "kotel_http_requests", *["kotel_http_server_duration_bucket"] * 2,
        "kotel_http_server_duration_count", "kotel_http_server_duration_sum"]  # fmt: skip


def test_points_of_one_series_merge_into_one_time_series_in_time_order() -> None:
    first, second = gauge(value=1, t=T + 10**9), gauge(value=2, t=T)
    assert rows(translate(first, second)) == {
        key("queue_size"): [(2.0, 1_700_000_000_123), (1.0, 1_700_000_001_123)]}  # fmt: skip


# --- staleness, delta, drops ---------------------------------------------------------------------

NO_VALUE = m.DATA_POINT_FLAGS_NO_RECORDED_VALUE_MASK


def test_no_recorded_value_becomes_the_staleness_nan_on_the_wire() -> None:
    assert bits(STALE_NAN) == 0x7FF0000000000002
    result = translate(gauge(flags=NO_VALUE), histogram([1], [1, 1], flags=NO_VALUE))
    body = encode_write_request(result.series)
    parsed = WriteRequest.FromString(bytes(cramjam.snappy.decompress_raw(body)))
    assert len(parsed.timeseries) == 5
    assert {bits(ts.samples[0].value) for ts in parsed.timeseries} == {0x7FF0000000000002}


def test_delta_sums_accumulate_across_requests() -> None:
    translator = PrometheusTranslator(config(target_info={"enabled": False}))
    first = translator.translate(request(total(value=5, temporality=DELTA, start=T - 10**9, t=T)))
    second = translator.translate(request(total(value=3, temporality=DELTA, start=T, t=T + 10**9)))
    assert rows(first)[key("http_requests_total")] == [(5.0, 1_700_000_000_123)]
    assert rows(second)[key("http_requests_total")] == [(8.0, 1_700_000_001_123)]
    again = translator.translate(request(total(value=3, temporality=DELTA, start=T, t=T + 10**9)))
    assert rows(again) == rows(second) and again.dropped == {}  # a retried batch does not count twice


def test_delta_histograms_and_exponential_histograms_accumulate() -> None:
    translator = PrometheusTranslator(config(target_info={"enabled": False}))
    translator.translate(request(histogram([1], [1, 2], 3.0, DELTA, T - 1, T)))
    second = rows(translator.translate(request(histogram([1], [4, 0], 1.0, DELTA, T, T + 1))))
    assert second[key("http_server_duration_seconds_bucket", le="1")][0][0] == 5.0
    assert second[key("http_server_duration_seconds_bucket", le="+Inf")][0][0] == 7.0
    assert second[key("http_server_duration_seconds_sum")][0][0] == 4.0
    translator.translate(request(exponential(1, 0, [1, 2], temporality=DELTA, start=T - 1, t=T)))
    merged = translator.translate(request(exponential(0, 0, [4], temporality=DELTA, start=T, t=T + 1)))
    assert buckets(merged) == {"2": 7.0, "+Inf": 7.0}  # scale 1 (1, 2**0.5], (2**0.5, 2] -> scale 0 (1, 2]


def test_delta_out_of_order_is_dropped_with_a_counter() -> None:
    translator = PrometheusTranslator(config(target_info={"enabled": False}))
    translator.translate(request(total(value=5, temporality=DELTA, start=T, t=T + 10)))
    late = translator.translate(request(total(value=1, temporality=DELTA, start=T - 10, t=T + 5)))
    assert late.series == [] and late.dropped == {"delta_out_of_order": 1}


def test_delta_reset_on_layout_change_staleness_and_eviction() -> None:
    translator = PrometheusTranslator(config(target_info={"enabled": False}), DeltaAccumulator(max_series=1))
    translator.translate(request(histogram([1], [1, 1], None, DELTA, 1, 2)))
    relaid = rows(translator.translate(request(histogram([5], [2, 0], None, DELTA, 2, 3))))
    assert relaid[key("http_server_duration_seconds_bucket", le="5")][0][0] == 2.0  # restarted
    name = key("http_requests_total")
    translator.translate(request(total(value=5, temporality=DELTA, start=1, t=2)))
    stale = translator.translate(request(total(value=0, temporality=DELTA, start=2, t=3, flags=NO_VALUE)))
    assert bits(rows(stale)[name][0][0]) == 0x7FF0000000000002
    restarted = translator.translate(request(total(value=4, temporality=DELTA, start=3, t=4)))
    assert rows(restarted)[name][0][0] == 4.0  # not 9: the marker ended the series
    translator.translate(request(total("other", value=1, temporality=DELTA, start=4, t=5)))  # evicts (max 1)
    evicted = translator.translate(request(total(value=2, temporality=DELTA, start=4, t=5)))
    assert rows(evicted)[name][0][0] == 2.0  # not 6
    assert translator.accumulator.evicted >= 1


def test_delta_drop_mode_and_unusable_metrics_are_counted() -> None:
    cfg = config(delta_temporality="drop", target_info={"enabled": False})
    unspecified = total()
    unspecified.sum.aggregation_temporality = m.AGGREGATION_TEMPORALITY_UNSPECIFIED
    result = translate(total(temporality=DELTA), histogram([1], [1, 1], temporality=DELTA), unspecified,
                       m.Metric(name="empty"), gauge(name=""), gauge(name="(#)"), cfg=cfg)  # fmt: skip
    assert result.series == []
    assert result.dropped == {"delta_temporality": 2, "unspecified_temporality": 1, "no_data": 1,
                              "invalid_metric_name": 2}  # fmt: skip


# --- metadata, wire, responses -------------------------------------------------------------------


def test_metadata_only_when_asked() -> None:
    assert translate(gauge()).metadata == []
    metric = histogram([1], [1, 1])
    metric.description = "time spent"
    result = translate(metric, total(), cfg=config(send_metadata=True))
    assert list(result.metadata) == [
        MetricMetadata(type=MetricMetadata.HISTOGRAM, metric_family_name="http_server_duration_seconds",
                       help="time spent", unit="seconds"),
        MetricMetadata(type=MetricMetadata.COUNTER, metric_family_name="http_requests_total")]  # fmt: skip


def test_encoding_round_trips_through_snappy() -> None:
    result = translate(histogram([1], [1, 1]), cfg=config(send_metadata=True))
    body = encode_write_request(result.series, result.metadata)
    parsed = WriteRequest.FromString(bytes(cramjam.snappy.decompress_raw(body)))
    assert list(parsed.timeseries) == result.series and list(parsed.metadata) == result.metadata
    assert remote_write_headers() == {
        "Content-Encoding": "snappy", "Content-Type": "application/x-protobuf",
        "X-Prometheus-Remote-Write-Version": "0.1.0", "User-Agent": "kotel/0.1.0"}  # fmt: skip


@pytest.mark.parametrize(("status", "body", "expected"), [
    (200, "", "ok"), (204, "", "ok"), (429, "slow down", "retry"), (500, "internal error", "retry"),
    (503, "", "retry"), (500, "out of bounds", "permanent"), (500, "err: too old sample", "permanent"),
    (500, "Out Of Order Sample", "permanent"), (500, "duplicate sample for timestamp", "permanent"),
    (400, "out of order sample", "permanent"), (400, "bad labels", "permanent"), (404, "", "permanent"),
    (413, "", "permanent"), (302, "", "permanent"),
])  # fmt: skip
def test_response_classes(status: int, body: str, expected: str) -> None:
    assert classify_prometheus_response(status, body) == expected


def test_an_ordinary_nan_value_is_not_the_staleness_marker() -> None:
    [[(value, _)]] = rows(translate(gauge(value=math.nan))).values()
    assert math.isnan(value) and bits(value) != 0x7FF0000000000002


def test_histogram_exemplars_go_to_the_bucket_of_their_value() -> None:
    metric = histogram([1, 10], [1, 1, 1])
    for value in (0.5, 5.0, 50.0):
        metric.histogram.data_points[0].exemplars.add(as_double=value, time_unix_nano=T)
    placed = {next(lb.value for lb in ts.labels if lb.name == "le"): [e.value for e in ts.exemplars]
              for ts in translate(metric).series if ts.exemplars}  # fmt: skip
    assert placed == {"1": [0.5], "10": [5.0], "+Inf": [50.0]}


# --- names and values ----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "unit", "kind", "expected"), [
    ("http.server.duration", "ms", Kind.HISTOGRAM, "http_server_duration_milliseconds"),
    ("system.filesystem.usage", "By", Kind.GAUGE, "system_filesystem_usage_bytes"),
    ("system.memory.utilization", "1", Kind.GAUGE, "system_memory_utilization_ratio"),
    ("system.network.dropped", "{packets}", Kind.COUNTER, "system_network_dropped_total"),
    ("system.network.dropped", "packets", Kind.COUNTER, "system_network_dropped_packets_total"),
    ("network.io", "By/s", Kind.GAUGE, "network_io_bytes_per_second"),
    ("requests", "{request}/s", Kind.GAUGE, "requests_per_second"),
    ("cpu.time", "s", Kind.COUNTER, "cpu_time_seconds_total"),
    ("disk.io", "KiBy", Kind.COUNTER, "disk_io_kibibytes_total"),
    ("room.temperature", "Cel", Kind.GAUGE, "room_temperature_celsius"),
    ("latency_seconds", "s", Kind.GAUGE, "latency_seconds"),
    ("requests.total", "", Kind.COUNTER, "requests_total"),
    ("total.requests", "", Kind.COUNTER, "requests_total"),
    ("(lambda).function.executions(#)", "", Kind.GAUGE, "lambda_function_executions"),
    ("2xx.responses", "", Kind.GAUGE, "_2xx_responses"),
    ("a:b.c", "", Kind.GAUGE, "a:b_c"),
])  # fmt: skip
def test_metric_names(name: str, unit: str, kind: Kind, expected: str) -> None:
    assert metric_name(name, unit, kind) == expected


def test_metric_names_with_namespace_or_without_suffixes() -> None:
    assert metric_name("queue.size", "ms", Kind.GAUGE, "kotel") == "kotel_queue_size_milliseconds"
    assert metric_name("queue.size", "", Kind.GAUGE, "my-team") == "my_team_queue_size"
    assert metric_name("http.requests", "ms", Kind.COUNTER, add_suffixes=False) == "http_requests"
    assert metric_name("a..b-c", "1", Kind.GAUGE, add_suffixes=False) == "a_b_c"


@pytest.mark.parametrize(("key", "expected"), [
    ("http.method", "http_method"), ("a..b", "a_b"), ("2fa", "key_2fa"), ("_private", "key_private"),
    ("__name__", "key_name_"), ("été", "key_t_"), ("ok_Name9", "ok_Name9"),
])  # fmt: skip
def test_label_names(key: str, expected: str) -> None:
    assert label_name(key) == expected


@pytest.mark.parametrize(("value", "expected"), [
    (AnyValue(bool_value=True), "true"), (AnyValue(int_value=-42), "-42"),
    (AnyValue(double_value=1.5), "1.5"), (AnyValue(double_value=1e-05), "0.00001"),
    (AnyValue(double_value=100.0), "100"), (AnyValue(bytes_value=b"\x00\xff"), "AP8="),
    (AnyValue(array_value=ArrayValue(values=[AnyValue(string_value="a"), AnyValue(int_value=1)])), '["a",1]'),
    (AnyValue(kvlist_value=KeyValueList(values=[kv("k", "v")])), '{"k":"v"}'), (AnyValue(), ""),
])  # fmt: skip
def test_attribute_values_as_text(value: AnyValue, expected: str) -> None:
    assert attribute_text(value) == expected


def test_le_and_quantile_formatting() -> None:
    assert [format_float(v) for v in (0.005, 1.0, 2.5e-7, 1e21, math.inf, -math.inf)] == [
        "0.005", "1", "0.00000025", "1000000000000000000000", "+Inf", "-Inf"]  # fmt: skip


@settings(max_examples=100, deadline=None)
@given(scale=st.integers(-4, 8), offset=st.integers(-300, 300), zero=st.integers(0, 50),
       positive=st.lists(st.integers(0, 1000), max_size=40),
       negative=st.lists(st.integers(0, 1000), max_size=40), neg_offset=st.integers(-300, 300))  # fmt: skip
def test_exponential_conversion_keeps_every_count(scale: int, offset: int, zero: int, positive: list[int],
                                                  negative: list[int], neg_offset: int) -> None:  # fmt: skip
    assume((offset + len(positive)) * 2 ** max(-scale, 0) < 1024)  # bounds past 2**1024 are only +Inf
    result = buckets(translate(exponential(scale, offset, positive, zero, (neg_offset, negative))))
    les = [float(le) for le in result]
    counts = list(result.values())
    assert les == sorted(les) and len(set(les)) == len(les) and les[-1] == math.inf
    assert counts == sorted(counts)  # cumulative
    assert counts[-1] == sum(positive) + zero + sum(negative)
    if len(counts) > 1:  # every observation lies below the largest finite bound
        assert counts[-2] == counts[-1]
    assert all(math.log2(abs(le)).is_integer() for le in les[:-1] if le != 0)  # powers of two
