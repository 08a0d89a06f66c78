"""Partition keys, split_by_key, merge_requests and split_to_max_bytes (with hypothesis properties)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from kotel.otlp import (
    OtlpDecodeError,
    OtlpSizeError,
    Signal,
    decode_protobuf,
    merge_requests,
    resource_key,
    split_by_key,
    split_serialized,
    split_to_max_bytes,
)


def _resource(**attrs: Any) -> Resource:
    res = Resource()
    for key, value in attrs.items():
        kv = KeyValue(key=key.replace("_", "."))
        if isinstance(value, int):
            kv.value.int_value = value
        else:
            kv.value.string_value = value
        res.attributes.append(kv)
    return res


def test_resource_key_precedence() -> None:
    assert resource_key(_resource(service_name="cart", service_instance_id="cart-1"), "fb") == "cart-1"
    assert resource_key(_resource(service_instance_id="cart-1", service_name="cart"), "fb") == "cart-1"
    assert resource_key(_resource(host_name="h", service_name="cart"), "fb") == "cart"
    assert resource_key(_resource(host_name="h"), "fb") == "fb"
    assert resource_key(_resource(service_instance_id="", service_name="cart"), "fb") == "cart"
    assert resource_key(_resource(service_instance_id=7), "fb") == "fb"  # only string values are keys


def _traces_with(resources: list[Resource], spans_per_scope: int = 2) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    for r, res in enumerate(resources):
        rs = req.resource_spans.add()
        rs.resource.CopyFrom(res)
        for s in range(2):
            ss = rs.scope_spans.add()
            ss.scope.name = f"scope-{s}"
            for i in range(spans_per_scope):
                ss.spans.add(name=f"r{r}s{s}i{i:03d}")
    return req


def test_split_by_key_groups_whole_resource_entries_in_order() -> None:
    req = _traces_with([_resource(service_instance_id="a"), _resource(service_name="b"), _resource(),
                        _resource(service_instance_id="a", host_name="other")])
    parts = split_by_key(Signal.TRACES, req, "fallback")
    assert list(parts) == ["a", "b", "fallback"]
    assert list(parts["a"].resource_spans) == [req.resource_spans[0], req.resource_spans[3]]
    assert list(parts["b"].resource_spans) == [req.resource_spans[1]]
    assert list(parts["fallback"].resource_spans) == [req.resource_spans[2]]


def test_split_by_key_single_key_is_no_copy_and_empty_is_empty() -> None:
    req = _traces_with([_resource(service_name="x"), _resource(service_name="x")])
    assert split_by_key(Signal.TRACES, req, "fb")["x"] is req
    assert split_by_key(Signal.LOGS, ExportLogsServiceRequest(), "fb") == {}


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(["i1", "i2", "n1", "n2", ""]), max_size=8))
def test_split_by_key_property(ids: list[str]) -> None:
    resources = [
        _resource(service_instance_id=k) if k.startswith("i")
        else _resource(service_name=k) if k else _resource()
        for k in ids
    ]
    req = _traces_with(resources, spans_per_scope=1)
    parts = split_by_key(Signal.TRACES, req, "fb")
    seen = [(key, entry.SerializeToString()) for key, part in parts.items() for entry in part.resource_spans]
    assert sorted(b for _, b in seen) == sorted(e.SerializeToString() for e in req.resource_spans)
    assert all(resource_key(Resource.FromString(_res(b)), "fb") == key for key, b in seen)


def _res(entry_bytes: bytes) -> bytes:
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans

    return ResourceSpans.FromString(entry_bytes).resource.SerializeToString()


def test_merge_requests() -> None:
    a = _traces_with([_resource(service_name="a")])
    b = _traces_with([_resource(service_name="b"), _resource(service_name="c")])
    merged = merge_requests(Signal.TRACES, [a, b])
    assert list(merged.resource_spans) == [*a.resource_spans, *b.resource_spans]
    with pytest.raises(TypeError) as err:
        merge_requests(Signal.TRACES, [a, ExportLogsServiceRequest()])
    assert str(err.value) == "cannot merge a ExportLogsServiceRequest into a traces request"


# --- split_to_max_bytes ------------------------------------------------------------------------------

_TEXT = st.text("abcdefghij", max_size=60)


def _shell(message: Any, field: str) -> bytes:
    """The message without one repeated field: keeps presence of empty resource/scope exactly."""
    copy = type(message)()
    copy.CopyFrom(message)
    copy.ClearField(field)
    return copy.SerializeToString()


def _flatten(signal: Signal, request: Any) -> list[tuple[bytes, ...]]:
    """Every item with its full context (resource, scope, metric identity); empty containers as markers."""
    out: list[tuple[bytes, ...]] = []
    for res in getattr(request, signal.resource_field):
        r = (_shell(res, signal.scope_field),)
        scopes = getattr(res, signal.scope_field)
        if not scopes:
            out.append(r)
        for scope in scopes:
            s = (*r, _shell(scope, signal.item_field))
            items = getattr(scope, signal.item_field)
            if not items:
                out.append(s)
            for item in items:
                kind = item.WhichOneof("data") if signal is Signal.METRICS else None
                if kind is None:
                    out.append((*s, item.SerializeToString()))
                    continue
                shell = metrics_pb2.Metric()
                shell.CopyFrom(item)
                del getattr(shell, kind).data_points[:]
                points = getattr(item, kind).data_points
                out.extend((*s, shell.SerializeToString(), p.SerializeToString()) for p in points)
                if not points:
                    out.append((*s, shell.SerializeToString()))
    return out


def _alone(signal: Signal, context: tuple[bytes, ...]) -> int:
    """Serialized size of the smallest request holding this flattened entry."""
    req = signal.request_class()
    res = getattr(req, signal.resource_field).add()
    res.ParseFromString(context[0])
    if len(context) > 1:
        scope = getattr(res, signal.scope_field).add()
        scope.ParseFromString(context[1])
        if len(context) > 2:
            item = getattr(scope, signal.item_field).add()
            item.ParseFromString(context[2])
            if len(context) > 3:
                getattr(item, item.WhichOneof("data")).data_points.add().ParseFromString(context[3])
    return req.ByteSize()


@st.composite
def requests(draw: st.DrawFn, signal: Signal) -> Any:
    req = signal.request_class()
    for _ in range(draw(st.integers(0, 3))):
        res = getattr(req, signal.resource_field).add(schema_url=draw(_TEXT))
        res.resource.attributes.add(key="service.name").value.string_value = draw(_TEXT)
        for _ in range(draw(st.integers(0, 3))):
            scope = getattr(res, signal.scope_field).add()
            scope.scope.name = draw(_TEXT)
            for n in range(draw(st.integers(0, 5))):
                items = getattr(scope, signal.item_field)
                if signal is Signal.TRACES:
                    items.add(name=draw(_TEXT), start_time_unix_nano=n)
                elif signal is Signal.LOGS:
                    items.add(body=AnyValue(string_value=draw(_TEXT)), time_unix_nano=n)
                else:
                    metric = items.add(name=draw(_TEXT), unit="ms")
                    kind = draw(st.sampled_from(["gauge", "sum", "histogram", "exponential_histogram",
                                                 "summary", None]))
                    if kind is not None:
                        data = getattr(metric, kind)
                        data.SetInParent()
                        if kind in ("sum", "histogram", "exponential_histogram"):
                            data.aggregation_temporality = metrics_pb2.AGGREGATION_TEMPORALITY_DELTA
                        for p in range(draw(st.integers(0, 6))):
                            point = data.data_points.add(time_unix_nano=p + 1)
                            point.attributes.add(key="k").value.string_value = draw(_TEXT)
    return req


@pytest.mark.parametrize("signal", list(Signal))
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_split_to_max_bytes_property(signal: Signal, data: st.DataObject) -> None:
    req = data.draw(requests(signal))
    flat = _flatten(signal, req)
    needed = max((_alone(signal, entry) for entry in flat), default=1)
    total = req.ByteSize()
    max_bytes = data.draw(st.integers(needed, max(needed, total + 3)))
    parts = split_to_max_bytes(signal, req, max_bytes)
    assert all(part.ByteSize() <= max_bytes for part in parts)
    assert _flatten(signal, merge_requests(signal, parts)) == flat  # each item once, in order, in context
    serialized = split_serialized(signal, req, max_bytes)
    assert all(len(b) <= max_bytes for b in serialized)
    assert [signal.request_class.FromString(b) for b in serialized] == parts
    if total <= max_bytes:
        assert parts == [req] and parts[0] is req
    if needed > 1:
        with pytest.raises(OtlpSizeError):
            split_to_max_bytes(signal, req, data.draw(st.integers(1, needed - 1)))


def test_split_packs_items_tightly() -> None:
    req = _traces_with([_resource(service_name="svc")], spans_per_scope=20)
    del req.resource_spans[0].scope_spans[1:]
    four = ExportTraceServiceRequest()
    four.CopyFrom(req)
    del four.resource_spans[0].scope_spans[0].spans[4:]
    parts = split_to_max_bytes(Signal.TRACES, req, four.ByteSize())
    assert [len(p.resource_spans[0].scope_spans[0].spans) for p in parts] == [4, 4, 4, 4, 4]
    assert all(p.resource_spans[0].resource == req.resource_spans[0].resource for p in parts)
    assert all(p.resource_spans[0].scope_spans[0].scope.name == "scope-0" for p in parts)


def test_split_metric_by_data_points_keeps_metric_identity() -> None:
    req = Signal.METRICS.request_class()
    metric = req.resource_metrics.add().scope_metrics.add().metrics.add(name="http.requests", unit="1")
    metric.sum.aggregation_temporality = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
    metric.sum.is_monotonic = True
    metric.sum.data_points.extend(metrics_pb2.NumberDataPoint(as_int=i, time_unix_nano=i) for i in range(10))
    parts = split_to_max_bytes(Signal.METRICS, req, req.ByteSize() // 3)
    assert len(parts) > 2
    points = []
    for part in parts:
        (got,) = part.resource_metrics[0].scope_metrics[0].metrics
        assert (got.name, got.unit, got.sum.aggregation_temporality, got.sum.is_monotonic) == (
            "http.requests", "1", metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE, True)
        points.extend(p.as_int for p in got.sum.data_points)
    assert points == list(range(10))


def test_item_too_large_error() -> None:
    req = _traces_with([_resource(service_name="svc")], spans_per_scope=3)
    req.resource_spans[0].scope_spans[1].spans[2].name = "x" * 500
    with pytest.raises(OtlpSizeError) as err:
        split_to_max_bytes(Signal.TRACES, req, 200)
    assert str(err.value) == (
        "span at resourceSpans[0].scopeSpans[1].spans[2] needs 548 bytes with its resource and scope, "
        "more than max_bytes=200"
    )


def test_resource_too_large_error_and_bad_arguments() -> None:
    req = _traces_with([_resource(service_name="s" * 300)], spans_per_scope=1)
    with pytest.raises(OtlpSizeError) as err:
        split_to_max_bytes(Signal.TRACES, req, 200)
    assert str(err.value) == (
        "resourceSpans[0] needs 329 bytes even without its items, more than max_bytes=200"
    )
    with pytest.raises(ValueError) as verr:
        split_to_max_bytes(Signal.TRACES, req, 0)
    assert str(verr.value) == "max_bytes must be positive, got 0"
    with pytest.raises(TypeError) as terr:
        split_serialized(Signal.LOGS, req, 100)
    assert str(terr.value) == "expected a ExportLogsServiceRequest, got ExportTraceServiceRequest"


def test_data_point_too_large_error_names_the_metric_kind() -> None:
    req = Signal.METRICS.request_class()
    metric = req.resource_metrics.add().scope_metrics.add().metrics.add(name="m")
    metric.exponential_histogram.data_points.add(count=1)
    big = metric.exponential_histogram.data_points.add(count=2)
    big.attributes.add(key="k").value.string_value = "v" * 300
    alone = _alone(Signal.METRICS, _flatten(Signal.METRICS, req)[1])
    assert alone > 300
    with pytest.raises(OtlpSizeError) as err:
        split_to_max_bytes(Signal.METRICS, req, 100)
    assert str(err.value) == (
        "data point at resourceMetrics[0].scopeMetrics[0].metrics[0].exponentialHistogram.dataPoints[1] "
        f"needs {alone} bytes with its resource and scope, more than max_bytes=100"
    )


def test_split_keeps_unknown_fields_including_groups() -> None:
    # An unknown group (wire types 3/4, field 100) holding a varint and a nested group, as an old producer
    # could send; upb keeps it as an unknown field and splitting must carry it, not choke on it.
    group = b"\xa3\x06" + b"\x08\x01" + b"\x3b" + b"\x12\x01x" + b"\x3c" + b"\xa4\x06"
    base = _traces_with([_resource(service_name="svc")], spans_per_scope=2)
    req = Signal.TRACES.request_class.FromString(base.SerializeToString() + group)
    parts = split_to_max_bytes(Signal.TRACES, req, req.ByteSize() - 1)
    assert len(parts) > 1
    assert all(p.SerializeToString().endswith(group) for p in parts)
    assert _flatten(Signal.TRACES, merge_requests(Signal.TRACES, parts)) == _flatten(Signal.TRACES, base)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(Signal)), st.binary(max_size=200), st.integers(1, 300))
def test_fuzz_protobuf_decode_and_split(signal: Signal, data: bytes, max_bytes: int) -> None:
    """Arbitrary bytes: a decode error, or a request that splits cleanly or says which item is too big."""
    try:
        req = decode_protobuf(signal, data)
    except OtlpDecodeError:
        return
    try:
        parts = split_to_max_bytes(signal, req, max_bytes)
    except OtlpSizeError:
        return
    assert all(p.ByteSize() <= max_bytes for p in parts)
    assert _flatten(signal, merge_requests(signal, parts)) == _flatten(signal, req)
