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

import functools
import math
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import cramjam
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2

from kotel import __version__
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
from streams.sinks.proto.remote_write_pb2 import (
    Exemplar,
    Label,
    MetricMetadata,
    Sample,
    TimeSeries,
    WriteRequest,
)

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

LabelKey = tuple[tuple[str, str], ...]


@dataclass(slots=True)
class TranslateResult:
    series: list[TimeSeries]
    metadata: list[MetricMetadata]
    #: data points left out, by reason (the sink exports these as a counter)
    dropped: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class _Resource:
    """What every point of one resource shares."""

    identity: dict[str, str]  # job and instance
    promoted: list[KeyValue]  # resource attributes copied onto points (resource_to_telemetry_conversion)
    scope: dict[str, str] = field(default_factory=dict)  # otel_scope_* of the scope being translated
    latest_ms: int = 0  # target_info's sample time: the resource's newest point


class _Batch:
    """Samples and exemplars per label set, in first-seen order."""

    def __init__(self) -> None:
        self.samples: dict[LabelKey, dict[int, float]] = {}
        self.exemplars: dict[LabelKey, list[Exemplar]] = {}

    def add(self, key: LabelKey, ms: int, value: float, exemplars: Sequence[Exemplar] = ()) -> None:
        self.samples.setdefault(key, {})[ms] = value  # same series and time: the last point wins
        if exemplars:
            self.exemplars.setdefault(key, []).extend(exemplars)

    def series(self, label_block: Callable[[tuple[str, str]], bytes]) -> list[TimeSeries]:
        out = []
        for key, samples in self.samples.items():
            series = TimeSeries.FromString(b"".join(map(label_block, key)))
            series.samples.extend(Sample(value=samples[ms], timestamp=ms) for ms in sorted(samples))
            if key in self.exemplars:
                series.exemplars.extend(self.exemplars[key])
            out.append(series)
        return out


def _label_block(pair: tuple[str, str]) -> bytes:
    """One label as protobuf serialises it inside a TimeSeries. Building Label messages one by one is the
    costliest step of a translation, while series share most of their label pairs; a message's encoding
    is the concatenation of its repeated elements', so translators memoise these blocks, join a series'
    blocks and let protobuf parse the result (about four times faster)."""
    return TimeSeries(labels=[Label(name=pair[0], value=pair[1])]).SerializeToString()


def _sorted(labels: Mapping[str, str]) -> LabelKey:
    return tuple(sorted((k, v) for k, v in labels.items() if v))


def _with(base: LabelKey, name: str, extra: tuple[str, str] | None = None) -> LabelKey:
    """A series' labels: a point's (sorted, non-empty) plus `__name__` and `le` / `quantile`, which win."""
    items = [("__name__", name), *base]
    if extra:
        items = [pair for pair in items if pair[0] != extra[0]]
        items.append(extra)
    items.sort()  # nearly sorted already: cheap
    return tuple(items)


def _ms(nanos: int) -> int:
    return nanos // 1_000_000


def _exemplars(source: Iterable[metrics_pb2.Exemplar]) -> list[Exemplar]:
    out = []
    for ex in source:
        labels = sanitized_labels(ex.filtered_attributes)
        if ex.trace_id:
            labels["trace_id"] = ex.trace_id.hex()
        if ex.span_id:
            labels["span_id"] = ex.span_id.hex()
        value = ex.as_double if ex.WhichOneof("value") == "as_double" else float(ex.as_int)
        out.append(Exemplar(labels=[Label(name=k, value=v) for k, v in sorted(labels.items()) if v],
                            value=value, timestamp=_ms(ex.time_unix_nano)))  # fmt: skip
    return out


class PrometheusTranslator:
    """Translates metrics requests for one sink; owns that sink's delta state."""

    def __init__(self, config: PrometheusRemoteWriteConfig, accumulator: DeltaAccumulator | None = None,
                 label_cache_size: int = 32_768) -> None:  # fmt: skip
        self.config = config
        self.accumulator = accumulator if accumulator is not None else DeltaAccumulator()
        self._external = {label_name(k): v for k, v in config.external_labels.items() if v}
        self._label_block = functools.lru_cache(maxsize=label_cache_size)(_label_block)

    def translate(self, request: ExportMetricsServiceRequest) -> TranslateResult:
        batch, result = _Batch(), TranslateResult([], [])
        families: dict[str, MetricMetadata] = {}
        for rm in request.resource_metrics:
            resource = self._resource(rm.resource.attributes)
            for sm in rm.scope_metrics:
                resource.scope = {"otel_scope_name": sm.scope.name, "otel_scope_version": sm.scope.version}
                for metric in sm.metrics:
                    self._metric(metric, resource, batch, result, families)
            if self.config.target_info.enabled and resource.latest_ms:
                self._target_info(rm.resource.attributes, resource, batch)
        result.series = batch.series(self._label_block)
        result.metadata = list(families.values()) if self.config.send_metadata else []
        return result

    # --- labels ----------------------------------------------------------------------------------

    def _resource(self, attributes: Sequence[KeyValue]) -> _Resource:
        texts = {kv.key: attribute_text(kv.value) for kv in attributes if kv.key in _IDENTIFYING}
        name, namespace = texts.get("service.name", ""), texts.get("service.namespace", "")
        identity = {"job": f"{namespace}/{name}" if namespace and name else name,
                    "instance": texts.get("service.instance.id", "")}  # fmt: skip
        promoted = list(attributes) if self.config.resource_to_telemetry_conversion.enabled else []
        return _Resource(identity, promoted)

    def _labels(self, attributes: Sequence[KeyValue], resource: _Resource) -> LabelKey:
        source: Iterable[KeyValue] = attributes
        if resource.promoted:
            own = {kv.key for kv in attributes}
            source = [*attributes, *(kv for kv in resource.promoted if kv.key not in own)]
        labels = sanitized_labels(source)
        labels.update((k, v) for k, v in resource.scope.items() if v)
        labels.update((k, v) for k, v in resource.identity.items() if v)
        for name, value in self._external.items():
            labels.setdefault(name, value)
        return _sorted(labels)

    def _target_info(self, attributes: Sequence[KeyValue], resource: _Resource, batch: _Batch) -> None:
        labels = sanitized_labels(kv for kv in attributes if kv.key not in _IDENTIFYING)
        if not any(labels.values()):
            return
        labels.update((k, v) for k, v in resource.identity.items() if v)
        for name, value in self._external.items():
            labels.setdefault(name, value)
        name = metric_name("target_info", "", Kind.GAUGE, self.config.namespace)
        batch.add(_with(_sorted(labels), name), resource.latest_ms, 1.0)

    # --- metrics ---------------------------------------------------------------------------------

    def _metric(self, metric: metrics_pb2.Metric, resource: _Resource, batch: _Batch, result: TranslateResult,
                families: dict[str, MetricMetadata]) -> None:  # fmt: skip
        data = metric.WhichOneof("data")
        if data is None:
            result.dropped["no_data"] += 1
            return
        points = getattr(metric, data).data_points
        kind, temporality = _kind(metric, data)
        cfg = self.config
        name = metric_name(metric.name, metric.unit, kind, "", cfg.add_metric_suffixes).strip("_")
        reason = ("invalid_metric_name" if not name
                  else "unspecified_temporality" if temporality not in (_CUMULATIVE, _DELTA)
                  else "delta_temporality" if temporality == _DELTA and cfg.delta_temporality == "drop"
                  else "")  # fmt: skip
        if reason:
            result.dropped[reason] += len(points)
            return
        name = metric_name(metric.name, metric.unit, kind, cfg.namespace, cfg.add_metric_suffixes)
        for point in points:
            labels = self._labels(point.attributes, resource)
            stale = bool(point.flags & _NO_RECORDED_VALUE)
            value = _value(point)
            if temporality == _DELTA:
                key = (kind, _with(labels, name))
                if stale:
                    self.accumulator.forget(key)  # the series ended: a later delta starts it afresh
                elif (value := self.accumulator.add(key, point.start_time_unix_nano, point.time_unix_nano,
                                                   value)) is None:  # fmt: skip
                    result.dropped["delta_out_of_order"] += 1
                    continue
            ms = _ms(point.time_unix_nano)
            resource.latest_ms = max(resource.latest_ms, ms)
            if isinstance(value, float):
                exemplars = _exemplars(point.exemplars) if kind is Kind.COUNTER else ()
                batch.add(_with(labels, name), ms, STALE_NAN if stale else value, exemplars)
            elif value is None:
                _summary(point, labels, name, ms, stale, batch)
            else:
                _histogram(value, point.exemplars, labels, name, ms, stale, batch)
        if len(points) and name not in families:
            families[name] = MetricMetadata(
                type=_METADATA_TYPES[kind], metric_family_name=name, help=metric.description,
                unit=prometheus_unit(metric.unit))  # fmt: skip


def _kind(metric: metrics_pb2.Metric, data: str) -> tuple[Kind, int]:
    """What the metric becomes, and its temporality (gauges and summaries count as cumulative)."""
    if data == "gauge":
        return Kind.GAUGE, _CUMULATIVE
    if data == "sum":
        return (Kind.COUNTER if metric.sum.is_monotonic else Kind.GAUGE), metric.sum.aggregation_temporality
    if data == "summary":
        return Kind.SUMMARY, _CUMULATIVE
    return Kind.HISTOGRAM, getattr(metric, data).aggregation_temporality


Point = (metrics_pb2.NumberDataPoint | metrics_pb2.HistogramDataPoint
         | metrics_pb2.ExponentialHistogramDataPoint | metrics_pb2.SummaryDataPoint)  # fmt: skip


def _value(point: Point) -> float | HistogramValue | ExpHistogramValue | None:
    if isinstance(point, metrics_pb2.NumberDataPoint):
        return point.as_double if point.WhichOneof("value") == "as_double" else float(point.as_int)
    if isinstance(point, metrics_pb2.HistogramDataPoint):
        return HistogramValue.of(point)
    if isinstance(point, metrics_pb2.ExponentialHistogramDataPoint):
        return ExpHistogramValue.of(point)
    return None  # summaries are sent as they are


def _histogram(value: HistogramValue | ExpHistogramValue, exemplars: Iterable[metrics_pb2.Exemplar],
               labels: LabelKey, name: str, ms: int, stale: bool, batch: _Batch) -> None:  # fmt: skip
    buckets = value.buckets()
    by_le: dict[float, list[Exemplar]] = {}
    for ex in _exemplars(exemplars):
        by_le.setdefault(bucket_for(ex.value, buckets), []).append(ex)
    for le, count in [*buckets, (math.inf, value.count)]:
        key = _with(labels, f"{name}_bucket", ("le", format_float(le)))
        batch.add(key, ms, STALE_NAN if stale else float(count), by_le.get(le, ()))
    if value.sum is not None:
        batch.add(_with(labels, f"{name}_sum"), ms, STALE_NAN if stale else value.sum)
    batch.add(_with(labels, f"{name}_count"), ms, STALE_NAN if stale else float(value.count))


def _summary(point: metrics_pb2.SummaryDataPoint, labels: LabelKey, name: str, ms: int, stale: bool,
             batch: _Batch) -> None:  # fmt: skip
    for q in point.quantile_values:
        key = _with(labels, name, ("quantile", format_float(q.quantile)))
        batch.add(key, ms, STALE_NAN if stale else q.value)
    batch.add(_with(labels, f"{name}_sum"), ms, STALE_NAN if stale else point.sum)
    batch.add(_with(labels, f"{name}_count"), ms, STALE_NAN if stale else float(point.count))


# --- the wire ------------------------------------------------------------------------------------


def encode_write_request(series: Sequence[TimeSeries], metadata: Sequence[MetricMetadata] = ()) -> bytes:
    """The request body: a WriteRequest, snappy block-compressed (not framed) as remote write requires."""
    body = WriteRequest(timeseries=series, metadata=metadata).SerializeToString()
    return bytes(cramjam.snappy.compress_raw(body))


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
