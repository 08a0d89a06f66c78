from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MetricsView(_message.Message):
    __slots__ = ("resource_metrics",)
    RESOURCE_METRICS_FIELD_NUMBER: _ClassVar[int]
    resource_metrics: _containers.RepeatedCompositeFieldContainer[ResourceMetricsView]
    def __init__(self, resource_metrics: _Optional[_Iterable[_Union[ResourceMetricsView, _Mapping]]] = ...) -> None: ...

class ResourceMetricsView(_message.Message):
    __slots__ = ("resource", "scope_metrics", "schema_url")
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    SCOPE_METRICS_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_URL_FIELD_NUMBER: _ClassVar[int]
    resource: bytes
    scope_metrics: _containers.RepeatedCompositeFieldContainer[ScopeMetricsView]
    schema_url: str
    def __init__(self, resource: _Optional[bytes] = ..., scope_metrics: _Optional[_Iterable[_Union[ScopeMetricsView, _Mapping]]] = ..., schema_url: _Optional[str] = ...) -> None: ...

class ScopeMetricsView(_message.Message):
    __slots__ = ("scope", "metrics", "schema_url")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_URL_FIELD_NUMBER: _ClassVar[int]
    scope: bytes
    metrics: _containers.RepeatedCompositeFieldContainer[MetricView]
    schema_url: str
    def __init__(self, scope: _Optional[bytes] = ..., metrics: _Optional[_Iterable[_Union[MetricView, _Mapping]]] = ..., schema_url: _Optional[str] = ...) -> None: ...

class MetricView(_message.Message):
    __slots__ = ("name", "description", "unit", "gauge", "sum", "histogram", "exponential_histogram", "summary", "metadata")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    GAUGE_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    EXPONENTIAL_HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    unit: str
    gauge: GaugeView
    sum: SumView
    histogram: HistogramView
    exponential_histogram: ExponentialHistogramView
    summary: SummaryView
    metadata: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., unit: _Optional[str] = ..., gauge: _Optional[_Union[GaugeView, _Mapping]] = ..., sum: _Optional[_Union[SumView, _Mapping]] = ..., histogram: _Optional[_Union[HistogramView, _Mapping]] = ..., exponential_histogram: _Optional[_Union[ExponentialHistogramView, _Mapping]] = ..., summary: _Optional[_Union[SummaryView, _Mapping]] = ..., metadata: _Optional[_Iterable[bytes]] = ...) -> None: ...

class GaugeView(_message.Message):
    __slots__ = ("data_points",)
    DATA_POINTS_FIELD_NUMBER: _ClassVar[int]
    data_points: _containers.RepeatedCompositeFieldContainer[NumberDataPointView]
    def __init__(self, data_points: _Optional[_Iterable[_Union[NumberDataPointView, _Mapping]]] = ...) -> None: ...

class SumView(_message.Message):
    __slots__ = ("data_points", "aggregation_temporality", "is_monotonic")
    DATA_POINTS_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_TEMPORALITY_FIELD_NUMBER: _ClassVar[int]
    IS_MONOTONIC_FIELD_NUMBER: _ClassVar[int]
    data_points: _containers.RepeatedCompositeFieldContainer[NumberDataPointView]
    aggregation_temporality: int
    is_monotonic: bool
    def __init__(self, data_points: _Optional[_Iterable[_Union[NumberDataPointView, _Mapping]]] = ..., aggregation_temporality: _Optional[int] = ..., is_monotonic: _Optional[bool] = ...) -> None: ...

class HistogramView(_message.Message):
    __slots__ = ("data_points", "aggregation_temporality")
    DATA_POINTS_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_TEMPORALITY_FIELD_NUMBER: _ClassVar[int]
    data_points: _containers.RepeatedCompositeFieldContainer[HistogramDataPointView]
    aggregation_temporality: int
    def __init__(self, data_points: _Optional[_Iterable[_Union[HistogramDataPointView, _Mapping]]] = ..., aggregation_temporality: _Optional[int] = ...) -> None: ...

class ExponentialHistogramView(_message.Message):
    __slots__ = ("data_points", "aggregation_temporality")
    DATA_POINTS_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_TEMPORALITY_FIELD_NUMBER: _ClassVar[int]
    data_points: _containers.RepeatedCompositeFieldContainer[ExponentialHistogramDataPointView]
    aggregation_temporality: int
    def __init__(self, data_points: _Optional[_Iterable[_Union[ExponentialHistogramDataPointView, _Mapping]]] = ..., aggregation_temporality: _Optional[int] = ...) -> None: ...

class SummaryView(_message.Message):
    __slots__ = ("data_points",)
    DATA_POINTS_FIELD_NUMBER: _ClassVar[int]
    data_points: _containers.RepeatedCompositeFieldContainer[SummaryDataPointView]
    def __init__(self, data_points: _Optional[_Iterable[_Union[SummaryDataPointView, _Mapping]]] = ...) -> None: ...

class NumberDataPointView(_message.Message):
    __slots__ = ("attributes", "start_time_unix_nano", "time_unix_nano", "as_double", "as_int", "exemplars", "flags")
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    START_TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    AS_DOUBLE_FIELD_NUMBER: _ClassVar[int]
    AS_INT_FIELD_NUMBER: _ClassVar[int]
    EXEMPLARS_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    attributes: _containers.RepeatedScalarFieldContainer[bytes]
    start_time_unix_nano: int
    time_unix_nano: int
    as_double: float
    as_int: int
    exemplars: _containers.RepeatedScalarFieldContainer[bytes]
    flags: int
    def __init__(self, attributes: _Optional[_Iterable[bytes]] = ..., start_time_unix_nano: _Optional[int] = ..., time_unix_nano: _Optional[int] = ..., as_double: _Optional[float] = ..., as_int: _Optional[int] = ..., exemplars: _Optional[_Iterable[bytes]] = ..., flags: _Optional[int] = ...) -> None: ...

class HistogramDataPointView(_message.Message):
    __slots__ = ("attributes", "start_time_unix_nano", "time_unix_nano", "count", "sum", "bucket_counts", "explicit_bounds", "exemplars", "flags")
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    START_TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    BUCKET_COUNTS_FIELD_NUMBER: _ClassVar[int]
    EXPLICIT_BOUNDS_FIELD_NUMBER: _ClassVar[int]
    EXEMPLARS_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    attributes: _containers.RepeatedScalarFieldContainer[bytes]
    start_time_unix_nano: int
    time_unix_nano: int
    count: int
    sum: float
    bucket_counts: _containers.RepeatedScalarFieldContainer[int]
    explicit_bounds: _containers.RepeatedScalarFieldContainer[float]
    exemplars: _containers.RepeatedScalarFieldContainer[bytes]
    flags: int
    def __init__(self, attributes: _Optional[_Iterable[bytes]] = ..., start_time_unix_nano: _Optional[int] = ..., time_unix_nano: _Optional[int] = ..., count: _Optional[int] = ..., sum: _Optional[float] = ..., bucket_counts: _Optional[_Iterable[int]] = ..., explicit_bounds: _Optional[_Iterable[float]] = ..., exemplars: _Optional[_Iterable[bytes]] = ..., flags: _Optional[int] = ...) -> None: ...

class ExponentialHistogramDataPointView(_message.Message):
    __slots__ = ("attributes", "start_time_unix_nano", "time_unix_nano", "count", "sum", "scale", "zero_count", "positive", "negative", "flags", "exemplars", "zero_threshold")
    class Buckets(_message.Message):
        __slots__ = ("offset", "bucket_counts")
        OFFSET_FIELD_NUMBER: _ClassVar[int]
        BUCKET_COUNTS_FIELD_NUMBER: _ClassVar[int]
        offset: int
        bucket_counts: _containers.RepeatedScalarFieldContainer[int]
        def __init__(self, offset: _Optional[int] = ..., bucket_counts: _Optional[_Iterable[int]] = ...) -> None: ...
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    START_TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    ZERO_COUNT_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    EXEMPLARS_FIELD_NUMBER: _ClassVar[int]
    ZERO_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    attributes: _containers.RepeatedScalarFieldContainer[bytes]
    start_time_unix_nano: int
    time_unix_nano: int
    count: int
    sum: float
    scale: int
    zero_count: int
    positive: ExponentialHistogramDataPointView.Buckets
    negative: ExponentialHistogramDataPointView.Buckets
    flags: int
    exemplars: _containers.RepeatedScalarFieldContainer[bytes]
    zero_threshold: float
    def __init__(self, attributes: _Optional[_Iterable[bytes]] = ..., start_time_unix_nano: _Optional[int] = ..., time_unix_nano: _Optional[int] = ..., count: _Optional[int] = ..., sum: _Optional[float] = ..., scale: _Optional[int] = ..., zero_count: _Optional[int] = ..., positive: _Optional[_Union[ExponentialHistogramDataPointView.Buckets, _Mapping]] = ..., negative: _Optional[_Union[ExponentialHistogramDataPointView.Buckets, _Mapping]] = ..., flags: _Optional[int] = ..., exemplars: _Optional[_Iterable[bytes]] = ..., zero_threshold: _Optional[float] = ...) -> None: ...

class SummaryDataPointView(_message.Message):
    __slots__ = ("attributes", "start_time_unix_nano", "time_unix_nano", "count", "sum", "quantile_values", "flags")
    class ValueAtQuantile(_message.Message):
        __slots__ = ("quantile", "value")
        QUANTILE_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        quantile: float
        value: float
        def __init__(self, quantile: _Optional[float] = ..., value: _Optional[float] = ...) -> None: ...
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    START_TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    QUANTILE_VALUES_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    attributes: _containers.RepeatedScalarFieldContainer[bytes]
    start_time_unix_nano: int
    time_unix_nano: int
    count: int
    sum: float
    quantile_values: _containers.RepeatedCompositeFieldContainer[SummaryDataPointView.ValueAtQuantile]
    flags: int
    def __init__(self, attributes: _Optional[_Iterable[bytes]] = ..., start_time_unix_nano: _Optional[int] = ..., time_unix_nano: _Optional[int] = ..., count: _Optional[int] = ..., sum: _Optional[float] = ..., quantile_values: _Optional[_Iterable[_Union[SummaryDataPointView.ValueAtQuantile, _Mapping]]] = ..., flags: _Optional[int] = ...) -> None: ...

class LogsView(_message.Message):
    __slots__ = ("resource_logs",)
    RESOURCE_LOGS_FIELD_NUMBER: _ClassVar[int]
    resource_logs: _containers.RepeatedCompositeFieldContainer[ResourceLogsView]
    def __init__(self, resource_logs: _Optional[_Iterable[_Union[ResourceLogsView, _Mapping]]] = ...) -> None: ...

class ResourceLogsView(_message.Message):
    __slots__ = ("resource", "scope_logs", "schema_url")
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    SCOPE_LOGS_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_URL_FIELD_NUMBER: _ClassVar[int]
    resource: bytes
    scope_logs: _containers.RepeatedCompositeFieldContainer[ScopeLogsView]
    schema_url: str
    def __init__(self, resource: _Optional[bytes] = ..., scope_logs: _Optional[_Iterable[_Union[ScopeLogsView, _Mapping]]] = ..., schema_url: _Optional[str] = ...) -> None: ...

class ScopeLogsView(_message.Message):
    __slots__ = ("scope", "log_records", "schema_url")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    LOG_RECORDS_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_URL_FIELD_NUMBER: _ClassVar[int]
    scope: bytes
    log_records: _containers.RepeatedCompositeFieldContainer[LogRecordView]
    schema_url: str
    def __init__(self, scope: _Optional[bytes] = ..., log_records: _Optional[_Iterable[_Union[LogRecordView, _Mapping]]] = ..., schema_url: _Optional[str] = ...) -> None: ...

class LogRecordView(_message.Message):
    __slots__ = ("time_unix_nano", "observed_time_unix_nano", "severity_number", "severity_text", "body", "attributes", "trace_id", "span_id", "event_name")
    TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_TIME_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_NUMBER_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_TEXT_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    SPAN_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_NAME_FIELD_NUMBER: _ClassVar[int]
    time_unix_nano: int
    observed_time_unix_nano: int
    severity_number: int
    severity_text: str
    body: bytes
    attributes: _containers.RepeatedScalarFieldContainer[bytes]
    trace_id: bytes
    span_id: bytes
    event_name: str
    def __init__(self, time_unix_nano: _Optional[int] = ..., observed_time_unix_nano: _Optional[int] = ..., severity_number: _Optional[int] = ..., severity_text: _Optional[str] = ..., body: _Optional[bytes] = ..., attributes: _Optional[_Iterable[bytes]] = ..., trace_id: _Optional[bytes] = ..., span_id: _Optional[bytes] = ..., event_name: _Optional[str] = ...) -> None: ...
