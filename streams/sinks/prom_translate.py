"""OTLP metrics as Prometheus remote-write 1.0 series: pure translation, encoding, response classes.

The rules are the OpenTelemetry "Prometheus and OpenMetrics Compatibility" spec as the Collector's
prometheusremotewrite exporter applies them (names in `prom_translate_names`, histograms in
`prom_translate_histograms`, delta state in `prom_translate_delta`). Labels of a point, later ones
winning: its attributes (plus resource attributes it lacks, with `resource_to_telemetry_conversion`),
`otel_scope_name` / `otel_scope_version`, `job` (`service.namespace/service.name`) and `instance`
(`service.instance.id`); external labels only where the name is still free; then `__name__`, `le`,
`quantile`. Empty values are left out; labels are sorted by name, samples by time; points that land on
the same series are merged into it. Retry a failed send with its encoded bytes rather than translating
again: the delta state has moved on (it recognises a copy of a series' last point, but drops older ones).
"""

from __future__ import annotations

import math
import struct
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import cramjam
from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from kotel import __version__
from kotel.otlp import Signal
from kotel.topology.exporters import PrometheusRemoteWriteConfig
from streams.sinks.prom_translate_delta import DeltaAccumulator
from streams.sinks.prom_translate_histograms import ExpHistogramValue, HistogramValue, bucket_for
from streams.sinks.prom_translate_names import (
    Kind,
    attribute_text,
    format_float,
    label_name,
    metric_name,
    prometheus_unit,
    sanitized_labels,
)
from streams.sinks.prom_translate_series import LabelKey, SampleBatch, Series, SeriesCache, with_name
from streams.sinks.proto.otlp_views_pb2 import MetricsView
from streams.sinks.proto.remote_write_pb2 import Exemplar, Label, MetricMetadata, TimeSeries, WriteRequest
from streams.sinks.wire import field as wire_field
from streams.sinks.wire import parse_view, raise_invalid

M = TypeVar("M", bound=Message)
STALE_NAN_BITS = 0x7FF0000000000002
#: Prometheus' staleness marker: a NaN with this exact bit pattern ends a series at once.
STALE_NAN: float = struct.unpack("<d", struct.pack("<Q", STALE_NAN_BITS))[0]
_NO_RECORDED_VALUE = metrics_pb2.DATA_POINT_FLAGS_NO_RECORDED_VALUE_MASK
_CUMULATIVE = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
_DELTA = metrics_pb2.AGGREGATION_TEMPORALITY_DELTA
_IDENTIFYING = frozenset({"service.name", "service.namespace", "service.instance.id"})
_METADATA_TYPES = {
    Kind.GAUGE: MetricMetadata.GAUGE,
    Kind.COUNTER: MetricMetadata.COUNTER,
    Kind.HISTOGRAM: MetricMetadata.HISTOGRAM,
    Kind.SUMMARY: MetricMetadata.SUMMARY,
}
_PERMANENT_5XX = ("out of bounds", "too old sample", "out of order sample", "duplicate sample for timestamp")



@dataclass(slots=True)
class TranslateResult:
    series: list[TimeSeries]
    metadata: list[MetricMetadata]
    #: data points left out, by reason (the sink exports these as a counter)
    dropped: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class WireResult:
    """A translation as remote-write bytes: each series a WriteRequest.timeseries field."""

    series: list[bytes]
    samples: list[int]  # per series
    metadata: list[MetricMetadata]
    dropped: Counter[str] = field(default_factory=Counter)

    def pieces(self, max_samples: int) -> list[tuple[bytes, int]]:
        """Consecutive series joined into pieces of at most max_samples samples (a longer series alone).

        Metadata (``send_metadata``) rides in the first piece: a request is the concatenation of its pieces,
        and WriteRequest fields may come in any order.
        """
        out: list[tuple[bytes, int]] = []
        chunk: list[bytes] = [wire_field(_METADATA_TAG, m.SerializeToString()) for m in self.metadata]
        weight = 0
        for encoded, count in zip(self.series, self.samples, strict=True):
            if chunk and weight + count > max_samples:
                out.append((b"".join(chunk), weight))
                chunk, weight = [], 0
            chunk.append(encoded)
            weight += count
        if chunk:
            out.append((b"".join(chunk), weight))
        return out


_METADATA_TAG = 3 << 3 | 2  # WriteRequest.metadata, length-delimited


@dataclass(slots=True)
class _Resource:
    """What every point of one resource shares."""

    identity: dict[str, str]  # job and instance
    promoted: list[KeyValue]  # resource attributes copied onto points (resource_to_telemetry_conversion)
    scope: dict[str, str] = field(default_factory=dict)  # otel_scope_* of the scope being translated
    latest_ms: int = 0  # target_info's sample time: the resource's newest point


def _sorted(labels: Mapping[str, str]) -> LabelKey:
    return tuple(sorted((k, v) for k, v in labels.items() if v))


def _parse(cls: type[M], data: bytes, record: bytes) -> M:
    try:
        return cls.FromString(data)
    except DecodeError:
        raise_invalid(Signal.METRICS, record)


def _exemplars(source: Iterable[bytes], record: bytes) -> list[tuple[float, bytes]]:
    """Each exemplar's value and its encoding as a TimeSeries.exemplars field."""
    out = []
    for data in source:
        ex = _parse(metrics_pb2.Exemplar, data, record)
        labels = sanitized_labels(ex.filtered_attributes)
        if ex.trace_id:
            labels["trace_id"] = ex.trace_id.hex()
        if ex.span_id:
            labels["span_id"] = ex.span_id.hex()
        value = ex.as_double if ex.WhichOneof("value") == "as_double" else float(ex.as_int)
        message = Exemplar(labels=[Label(name=k, value=v) for k, v in sorted(labels.items()) if v],
                           value=value, timestamp=_ms(ex.time_unix_nano))  # fmt: skip
        out.append((value, wire_field(0x1A, message.SerializeToString())))
    return out


def _ms(nanos: int) -> int:
    return nanos // 1_000_000


class PrometheusTranslator:
    """Translates metrics requests for one sink; owns that sink's delta state and series cache."""

    def __init__(self, config: PrometheusRemoteWriteConfig, accumulator: DeltaAccumulator | None = None,
                 label_cache_size: int = 32_768, series_cache_size: int = 100_000) -> None:  # fmt: skip
        self.config = config
        self.accumulator = accumulator if accumulator is not None else DeltaAccumulator()
        self.cache = SeriesCache(series_cache_size, label_cache_size)
        self._external = {label_name(k): v for k, v in config.external_labels.items() if v}
        self._attribute_labels: dict[tuple[bytes, ...], dict[str, str]] = {}

    def translate(self, request: ExportMetricsServiceRequest) -> TranslateResult:
        """The series as messages (tests, tools); the sink sends translate_wire's bytes."""
        wire = self.translate_wire(request.SerializeToString())
        series = list(WriteRequest.FromString(b"".join(wire.series)).timeseries)
        return TranslateResult(series, wire.metadata, wire.dropped)

    def translate_wire(self, record: bytes) -> WireResult:
        """One OTLP ExportMetricsServiceRequest (protobuf bytes) as remote-write series bytes."""
        view = parse_view(MetricsView, Signal.METRICS, record)
        batch = SampleBatch()
        dropped: Counter[str] = Counter()
        families: dict[str, MetricMetadata] = {}
        for rm in view.resource_metrics:
            attributes = _parse(Resource, rm.resource, record).attributes
            resource = self._resource(attributes)
            for sm in rm.scope_metrics:
                scope = _parse(InstrumentationScope, sm.scope, record)
                resource.scope = {"otel_scope_name": scope.name, "otel_scope_version": scope.version}
                points = self.cache.context((rm.resource, scope.name, scope.version))
                for metric in sm.metrics:
                    for data in metric.metadata:  # unused, but a malformed one makes the record invalid
                        _parse(KeyValue, data, record)
                    self._metric(metric, resource, points, batch, dropped, families, record)
            if self.config.target_info.enabled and resource.latest_ms:
                self._target_info(attributes, resource, batch)
        series, samples = batch.encode()
        metadata = list(families.values()) if self.config.send_metadata else []
        return WireResult(series, samples, metadata, dropped)

    # --- labels ----------------------------------------------------------------------------------

    def _resource(self, attributes: Sequence[KeyValue]) -> _Resource:
        texts = {kv.key: attribute_text(kv.value) for kv in attributes if kv.key in _IDENTIFYING}
        name, namespace = texts.get("service.name", ""), texts.get("service.namespace", "")
        identity = {"job": f"{namespace}/{name}" if namespace and name else name,
                    "instance": texts.get("service.instance.id", "")}  # fmt: skip
        promoted = list(attributes) if self.config.resource_to_telemetry_conversion.enabled else []
        return _Resource(identity, promoted)

    def _series(self, points: dict[tuple[bytes, ...], Series], key: tuple[bytes, ...], resource: _Resource,
                record: bytes) -> Series:  # fmt: skip
        """A cache miss: the point's labels from its attributes, resource and scope."""
        if resource.promoted:
            attributes = [_parse(KeyValue, data, record) for data in key]
            own = {kv.key for kv in attributes}
            labels = sanitized_labels([*attributes, *(kv for kv in resource.promoted if kv.key not in own)])
        else:  # attribute sets recur across resources: their sanitised labels are cached on their own
            labels = self._attribute_labels.get(key)  # type: ignore[assignment]
            if labels is None:
                if len(self._attribute_labels) >= self.cache.max_entries:
                    self._attribute_labels.clear()
                labels = self._attribute_labels[key] = sanitized_labels(
                    _parse(KeyValue, data, record) for data in key)  # fmt: skip
            labels = dict(labels)
        labels.update((k, v) for k, v in resource.scope.items() if v)
        labels.update((k, v) for k, v in resource.identity.items() if v)
        for name, value in self._external.items():
            labels.setdefault(name, value)
        return self.cache.add(points, key, _sorted(labels))

    def _target_info(self, attributes: Sequence[KeyValue], resource: _Resource, batch: SampleBatch) -> None:
        labels = sanitized_labels(kv for kv in attributes if kv.key not in _IDENTIFYING)
        if not any(labels.values()):
            return
        labels.update((k, v) for k, v in resource.identity.items() if v)
        for name, value in self._external.items():
            labels.setdefault(name, value)
        name = metric_name("target_info", "", Kind.GAUGE, self.config.namespace)
        batch.add(self.cache.block(with_name(_sorted(labels), name)), resource.latest_ms, 1.0)

    # --- metrics ---------------------------------------------------------------------------------

    def _metric(self, metric: Any, resource: _Resource, points: dict[tuple[bytes, ...], Series],
                batch: SampleBatch, dropped: Counter[str], families: dict[str, MetricMetadata],
                record: bytes) -> None:  # fmt: skip
        data = metric.WhichOneof("data")
        if data is None:
            dropped["no_data"] += 1
            return
        source = getattr(metric, data).data_points
        kind, temporality = _kind(metric, data)
        cfg = self.config
        name = metric_name(metric.name, metric.unit, kind, "", cfg.add_metric_suffixes).strip("_")
        reason = ("invalid_metric_name" if not name
                  else "unspecified_temporality" if temporality not in (_CUMULATIVE, _DELTA)
                  else "delta_temporality" if temporality == _DELTA and cfg.delta_temporality == "drop"
                  else "")  # fmt: skip
        if reason:
            dropped[reason] += len(source)
            return
        name = metric_name(metric.name, metric.unit, kind, cfg.namespace, cfg.add_metric_suffixes)
        if data in ("gauge", "sum"):
            self._numbers(source, kind, temporality == _DELTA, name, resource, points, batch, dropped, record)
        else:
            self._others(data, source, kind, temporality == _DELTA, name, resource, points, batch, dropped,
                         record)  # fmt: skip
        if len(source) and name not in families:
            families[name] = MetricMetadata(
                type=_METADATA_TYPES[kind], metric_family_name=name, help=metric.description,
                unit=prometheus_unit(metric.unit))  # fmt: skip

    def _numbers(self, source: Any, kind: Kind, delta: bool, name: str, resource: _Resource,
                 points: dict[tuple[bytes, ...], Series], batch: SampleBatch, dropped: Counter[str],
                 record: bytes) -> None:  # fmt: skip
        """Gauge and sum points: the hot loop, so the cache lookups are written out here."""
        cache, accumulator, counter = self.cache, self.accumulator, kind is Kind.COUNTER
        latest = resource.latest_ms
        for point in source:
            key = tuple(point.attributes)
            series = points.get(key) or self._series(points, key, resource, record)
            labels = series.named.get(name) or cache.named(series, name)
            value = point.as_double
            if not value and point.WhichOneof("value") != "as_double":
                value = float(point.as_int)
            stale = point.flags & _NO_RECORDED_VALUE
            if delta:
                if stale:
                    accumulator.forget((kind, labels))  # the series ended: a later delta starts it afresh
                elif (value := accumulator.add(  # type: ignore[assignment]
                        (kind, labels), point.start_time_unix_nano, point.time_unix_nano, value)) is None:
                    dropped["delta_out_of_order"] += 1
                    continue
            ms = point.time_unix_nano // 1_000_000
            if ms > latest:
                latest = ms
            exemplars = None
            if counter and point.exemplars:
                exemplars = [encoded for _, encoded in _exemplars(point.exemplars, record)]
            batch.add(labels, ms, STALE_NAN if stale else value, exemplars)
        resource.latest_ms = latest

    def _others(self, data: str, source: Any, kind: Kind, delta: bool, name: str, resource: _Resource,
                points: dict[tuple[bytes, ...], Series], batch: SampleBatch, dropped: Counter[str],
                record: bytes) -> None:  # fmt: skip
        """Histogram, exponential histogram and summary points."""
        cache = self.cache
        for point in source:
            key = tuple(point.attributes)
            series = points.get(key) or self._series(points, key, resource, record)
            stale = bool(point.flags & _NO_RECORDED_VALUE)
            value: HistogramValue | ExpHistogramValue | None = (
                HistogramValue.of(point) if data == "histogram"
                else ExpHistogramValue.of(point) if data == "exponential_histogram" else None)  # fmt: skip
            if delta and value is not None:
                state_key = (kind, cache.named(series, name))
                if stale:
                    self.accumulator.forget(state_key)
                elif (value := self.accumulator.add(
                        state_key, point.start_time_unix_nano, point.time_unix_nano, value)) is None:
                    dropped["delta_out_of_order"] += 1
                    continue
            ms = _ms(point.time_unix_nano)
            resource.latest_ms = max(resource.latest_ms, ms)
            if value is None:
                _summary(point, series, cache, name, ms, stale, batch)
            else:
                _histogram(value, point.exemplars, series, cache, name, ms, stale, batch, record)


def _kind(metric: Any, data: str) -> tuple[Kind, int]:
    """What the metric becomes, and its temporality (gauges and summaries count as cumulative)."""
    if data == "gauge":
        return Kind.GAUGE, _CUMULATIVE
    if data == "sum":
        return (Kind.COUNTER if metric.sum.is_monotonic else Kind.GAUGE), metric.sum.aggregation_temporality
    if data == "summary":
        return Kind.SUMMARY, _CUMULATIVE
    return Kind.HISTOGRAM, getattr(metric, data).aggregation_temporality


def _histogram(value: HistogramValue | ExpHistogramValue, exemplars: Sequence[bytes], series: Series,
               cache: SeriesCache, name: str, ms: int, stale: bool, batch: SampleBatch,
               record: bytes) -> None:  # fmt: skip
    buckets = value.buckets()
    les = tuple(le for le, _ in buckets)
    labels = series.named.get((name, les))
    if labels is None:  # every bucket's label set, then _sum's and _count's, for this bucket layout
        labels = series.named[(name, les)] = (
            *(cache.named(series, f"{name}_bucket", ("le", format_float(le))) for le in (*les, math.inf)),
            cache.named(series, f"{name}_sum"), cache.named(series, f"{name}_count"))  # fmt: skip
    by_le: dict[float, list[bytes]] = {}
    if exemplars:
        for ex_value, encoded in _exemplars(exemplars, record):
            by_le.setdefault(bucket_for(ex_value, buckets), []).append(encoded)
    add = batch.add
    for index, (le, count) in enumerate([*buckets, (math.inf, value.count)]):
        add(labels[index], ms, STALE_NAN if stale else float(count), by_le.get(le))
    if value.sum is not None:
        add(labels[-2], ms, STALE_NAN if stale else value.sum)
    add(labels[-1], ms, STALE_NAN if stale else float(value.count))


def _summary(point: Any, series: Series, cache: SeriesCache, name: str, ms: int, stale: bool,
             batch: SampleBatch) -> None:  # fmt: skip
    for q in point.quantile_values:
        labels = cache.named(series, name, ("quantile", format_float(q.quantile)))
        batch.add(labels, ms, STALE_NAN if stale else q.value)
    batch.add(cache.named(series, f"{name}_sum"), ms, STALE_NAN if stale else point.sum)
    batch.add(cache.named(series, f"{name}_count"), ms, STALE_NAN if stale else float(point.count))


# --- the wire ------------------------------------------------------------------------------------


def encode_write_request(series: Sequence[TimeSeries], metadata: Sequence[MetricMetadata] = ()) -> bytes:
    """The request body: a WriteRequest, snappy block-compressed (not framed) as remote write requires."""
    body = WriteRequest(timeseries=series, metadata=metadata).SerializeToString()
    return bytes(cramjam.snappy.compress_raw(body))


def encode_series(series: Iterable[bytes]) -> bytes:
    """A request body from translate_wire's series bytes (a WriteRequest is its fields, concatenated)."""
    return bytes(cramjam.snappy.compress_raw(b"".join(series)))


def remote_write_headers(user_agent: str = f"kotel/{__version__}") -> dict[str, str]:
    return {"Content-Encoding": "snappy", "Content-Type": "application/x-protobuf",
            "X-Prometheus-Remote-Write-Version": "0.1.0", "User-Agent": user_agent}  # fmt: skip


def classify_prometheus_response(status: int, body: str) -> Literal["ok", "retry", "permanent"]:
    """Retry 5xx and 429; the rest is permanent, as are 5xx bodies naming a sample the TSDB refuses for
    good (some receivers answer those with 500 although resending cannot help)."""
    if 200 <= status < 300:
        return "ok"
    if status == 429:
        return "retry"
    if status >= 500:
        text = body.lower()
        return "permanent" if any(marker in text for marker in _PERMANENT_5XX) else "retry"
    return "permanent"
