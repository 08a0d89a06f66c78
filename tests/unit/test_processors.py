"""The processor factory, the resource processor (with the tenant rule) and the filter processor."""

from __future__ import annotations

import hashlib
import logging
import struct

import pytest
from opentelemetry.proto.logs.v1.logs_pb2 import SEVERITY_NUMBER_DEBUG, SEVERITY_NUMBER_INFO

from agents.contracts import InvalidRequest
from agents.processors import (
    DegradeProcessor,
    FilterProcessor,
    GroupByAttrsProcessor,
    MemoryLimiter,
    ProbabilisticSampler,
    ResourceProcessor,
    build_processor,
)
from agents.telemetry import AgentMetrics
from kotel.otlp import Signal, count_items
from kotel.topology.exporters import DegradeConfig
from kotel.topology.processors import (
    BatchConfig,
    FilterConfig,
    GroupByAttrsConfig,
    MemoryLimiterConfig,
    ProbabilisticSamplerConfig,
    ResourceConfig,
)
from tests.unit.otlp_builders import as_dict, build, counter, dropped, gauge, items, log, overwrites, span

T, M, L = Signal.TRACES, Signal.METRICS, Signal.LOGS


@pytest.fixture
def metrics() -> AgentMetrics:
    return AgentMetrics()


# --- factory ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "config", "cls"), [
    ("resource", ResourceConfig(attributes=[{"key": "env", "value": "prod", "action": "insert"}]),
     ResourceProcessor),
    ("filter/tenant-a", FilterConfig(), FilterProcessor),
    ("probabilistic_sampler", ProbabilisticSamplerConfig(sampling_percentage=5), ProbabilisticSampler),
    ("groupbyattrs", GroupByAttrsConfig(keys=["service.instance.id"]), GroupByAttrsProcessor),
    ("memory_limiter", MemoryLimiterConfig(limit_mib=100), MemoryLimiter),
    ("degrade", DegradeConfig(), DegradeProcessor),
])  # fmt: skip
def test_factory_builds_by_component_type(name, config, cls, metrics) -> None:
    processor = build_processor(name, config, metrics)
    assert type(processor) is cls
    assert processor.name == name


def test_factory_rejects_unknown_types_and_wrong_configs(metrics) -> None:
    with pytest.raises(ValueError) as err:
        build_processor("batch", BatchConfig(), metrics)
    assert str(err.value) == (
        "no agent processor for component 'batch' of type 'batch' (batching is the agent's batcher, not "
        "a processor); known types: degrade, filter, groupbyattrs, memory_limiter, probabilistic_sampler, "
        "resource"
    )
    with pytest.raises(ValueError, match=r"^no agent processor for component 'attributes/x' of type "):
        build_processor("attributes/x", FilterConfig(), metrics)
    with pytest.raises(TypeError) as err2:
        build_processor("filter/a", GroupByAttrsConfig(), metrics)
    assert str(err2.value) == "component 'filter/a' needs a FilterConfig, got GroupByAttrsConfig"


def test_factory_passes_the_tenancy_attribute(metrics) -> None:
    config = ResourceConfig(attributes=[{"key": "org", "value": "acme", "action": "insert"}])
    processor = build_processor("resource", config, metrics, tenancy_attribute="org")
    request = build(T, ({"org": "evil"}, [[span()]]))
    processor.process(T, request)
    assert as_dict(request.resource_spans[0].resource.attributes) == {"org": "acme"}
    assert overwrites(metrics, T) == 1


# --- resource -----------------------------------------------------------------------------------------


def _resource(metrics: AgentMetrics, *actions: dict, tenancy: str = "tenant") -> ResourceProcessor:
    return ResourceProcessor(ResourceConfig(attributes=list(actions)), metrics, "resource", tenancy)


def _attrs_after(processor: ResourceProcessor, attrs: dict, signal: Signal = T) -> dict:
    request = build(signal, (attrs, [[span()] if signal is T else [log()]]))
    assert processor.process(signal, request) is request
    return as_dict(getattr(request, signal.resource_field)[0].resource.attributes)


@pytest.mark.parametrize(("action", "before", "after"), [
    ("insert", {}, {"k": "new"}),
    ("insert", {"k": "old"}, {"k": "old"}),
    ("update", {}, {}),
    ("update", {"k": "old"}, {"k": "new"}),
    ("upsert", {}, {"k": "new"}),
    ("upsert", {"k": "old"}, {"k": "new"}),
])  # fmt: skip
def test_resource_value_actions(action, before, after, metrics) -> None:
    processor = _resource(metrics, {"key": "k", "value": "new", "action": action})
    assert _attrs_after(processor, {"a": 1, **before}) == {"a": 1, **after}


@pytest.mark.parametrize(("action", "before", "after"), [
    ("insert", {"src": "v"}, {"src": "v", "k": "v"}),
    ("insert", {}, {}),  # the source is missing: no-op
    ("update", {"src": 7, "k": "old"}, {"src": 7, "k": 7}),
    ("upsert", {"src": True}, {"src": True, "k": True}),
    ("upsert", {"k": "old"}, {"k": "old"}),
])  # fmt: skip
def test_resource_from_attribute(action, before, after, metrics) -> None:
    processor = _resource(metrics, {"key": "k", "from_attribute": "src", "action": action})
    assert _attrs_after(processor, before) == after


def test_resource_values_keep_their_type(metrics) -> None:
    processor = _resource(metrics, {"key": "i", "value": 3, "action": "insert"},
                          {"key": "f", "value": 0.5, "action": "insert"},
                          {"key": "b", "value": False, "action": "insert"},
                          {"key": "s", "value": "3", "action": "insert"})  # fmt: skip
    request = build(M, ({}, [[gauge("g", {})]]))
    processor.process(M, request)
    kinds = {kv.key: kv.value.WhichOneof("value") for kv in request.resource_metrics[0].resource.attributes}
    assert kinds == {"i": "int_value", "f": "double_value", "b": "bool_value", "s": "string_value"}
    resource = request.resource_metrics[0].resource
    assert as_dict(resource.attributes) == {"i": 3, "f": 0.5, "b": False, "s": "3"}


def test_resource_delete_removes_every_occurrence(metrics) -> None:
    processor = _resource(metrics, {"key": "k", "action": "delete"})
    request = build(L, ({"a": 1}, [[log()]]))
    request.resource_logs[0].resource.attributes.add(key="k").value.string_value = "x"
    request.resource_logs[0].resource.attributes.add(key="k").value.string_value = "y"
    processor.process(L, request)
    assert [kv.key for kv in request.resource_logs[0].resource.attributes] == ["a"]
    assert _attrs_after(processor, {"b": 2}) == {"b": 2}


@pytest.mark.parametrize(("value", "data"), [
    ("abc", b"abc"),
    (1, struct.pack("<q", 1)),
    (-2, b"\xfe" + b"\xff" * 7),
    (1.5, struct.pack("<d", 1.5)),
    (True, b"\x01"),
    (False, b"\x00"),
])  # fmt: skip
def test_resource_hash_is_sha256_hex_of_the_value_bytes(value, data, metrics) -> None:
    processor = _resource(metrics, {"key": "k", "action": "hash"})
    assert _attrs_after(processor, {"k": value}) == {"k": hashlib.sha256(data).hexdigest()}


def test_resource_hash_known_vector_and_nothing_to_hash(metrics) -> None:
    processor = _resource(metrics, {"key": "k", "action": "hash"})
    sha256_abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert _attrs_after(processor, {"k": "abc"}) == {"k": sha256_abc}
    assert _attrs_after(processor, {"k": ""}) == {"k": ""}
    assert _attrs_after(processor, {"k": b"\x00"}) == {"k": ""}  # bytes are not hashed, as in the Collector
    assert _attrs_after(processor, {"other": "abc"}) == {"other": "abc"}


def test_tenant_is_enforced_and_each_overwritten_resource_counted(metrics) -> None:
    processor = _resource(metrics, {"key": "tenant", "value": "tenant-a", "action": "insert"},
                          {"key": "env", "value": "prod", "action": "insert"})  # fmt: skip
    request = build(T,
                    ({"tenant": "tenant-b", "service.name": "x"}, [[span()]]),  # spoofed: overwritten
                    ({"tenant": "tenant-a"}, [[span()]]),  # already right: untouched
                    ({}, [[span()]]),  # absent: inserted, not an overwrite
                    ({"tenant": 42}, [[span()]]))  # fmt: skip
    processor.process(T, request)
    tenants = [as_dict(e.resource.attributes)["tenant"] for e in request.resource_spans]
    assert tenants == ["tenant-a"] * 4
    assert as_dict(request.resource_spans[0].resource.attributes) == {
        "tenant": "tenant-a", "service.name": "x", "env": "prod"}
    assert overwrites(metrics, T) == 2
    assert overwrites(metrics, L) == 0


def test_tenant_rule_beats_the_action_and_duplicates(metrics) -> None:
    processor = _resource(metrics, {"key": "tenant", "value": "a", "action": "delete"})
    request = build(L, ({"tenant": "a"}, [[log()]]))
    request.resource_logs[0].resource.attributes.add(key="tenant").value.string_value = "b"
    processor.process(L, request)
    assert [(kv.key, kv.value.string_value) for kv in request.resource_logs[0].resource.attributes] == [
        ("tenant", "a")]
    assert overwrites(metrics, L) == 1
    update = _resource(metrics, {"key": "tenant", "value": "a", "action": "update"})
    assert _attrs_after(update, {}) == {"tenant": "a"}


@pytest.mark.parametrize(("actions", "message"), [
    ([{"key": "tenant", "from_attribute": "k8s.namespace.name", "action": "upsert"}],
     "resource: the tenancy attribute 'tenant' must be set from a constant string 'value' (the agent "
     "enforces it whatever the action says); action 'upsert' has no value"),
    ([{"key": "tenant", "action": "hash"}],
     "resource: the tenancy attribute 'tenant' must be set from a constant string 'value' (the agent "
     "enforces it whatever the action says); action 'hash' has no value"),
    ([{"key": "tenant", "value": 7, "action": "insert"}],
     "resource: the tenancy attribute 'tenant' must be set from a constant string 'value' (the agent "
     "enforces it whatever the action says); action 'insert' has int 7"),
    ([{"key": "tenant", "value": "a", "action": "insert"},
      {"key": "tenant", "value": "b", "action": "upsert"}],
     "resource: the tenancy attribute 'tenant' is set to two values: 'a' and 'b'"),
])  # fmt: skip
def test_tenant_needs_one_constant_string(actions, message, metrics) -> None:
    with pytest.raises(ValueError) as err:
        _resource(metrics, *actions)
    assert str(err.value) == message


# --- filter -------------------------------------------------------------------------------------------


def _filter(counters: AgentMetrics, error_mode: str = "propagate", **signals: dict) -> FilterProcessor:
    return FilterProcessor(FilterConfig(error_mode=error_mode, **signals), counters, "filter")


def test_seed_health_check_filter(metrics) -> None:
    processor = _filter(metrics, traces={"span": ['attributes["http.target"] == "/health"']})
    request = build(T,
                    ({"service.name": "a"}, [[span("GET /health", **{"http.target": "/health"}),
                                              span("GET /orders", **{"http.target": "/orders"})],
                                             [span("GET /health", **{"http.target": "/health"})]]),
                    ({"service.name": "b"}, [[span("GET /health", **{"http.target": "/health"})]]),
                    ({"service.name": "c"}, [[span("no target")]]))  # fmt: skip
    out = processor.process(T, request)
    assert out is request
    assert [s.name for s in items(T, out)] == ["GET /orders", "no target"]
    # the emptied scope and resource entries are gone
    assert [len(e.scope_spans) for e in out.resource_spans] == [1, 1]
    assert dropped(metrics, T, "filtered") == 3


def test_filter_drops_when_any_condition_matches_and_returns_none_when_empty(metrics) -> None:
    processor = _filter(metrics, traces={"span": ['name == "a"', 'attributes["x"] == 1']})
    request = build(T, ({}, [[span("a"), span("b", x=1), span("c", x=2)]]))
    assert [s.name for s in items(T, processor.process(T, request))] == ["c"]
    assert processor.process(T, build(T, ({}, [[span("a")]]))) is None
    assert dropped(metrics, T, "filtered") == 3


def test_filter_leaves_signals_without_conditions_alone(metrics) -> None:
    processor = _filter(metrics, traces={"span": ["true"]})
    request = build(L, ({}, [[log("x")]]))
    assert processor.process(L, request) is request
    assert count_items(request) == 1


def test_filter_logs(metrics) -> None:
    processor = _filter(metrics, logs={"log_record": ["severity_number < SEVERITY_NUMBER_INFO"]})
    request = build(L, ({}, [[log("debug", SEVERITY_NUMBER_DEBUG), log("info", SEVERITY_NUMBER_INFO)]]))
    assert [r.body.string_value for r in items(L, processor.process(L, request))] == ["info"]
    assert dropped(metrics, L, "filtered") == 1


def test_filter_datapoints_and_metrics_left_empty(metrics) -> None:
    processor = _filter(metrics, metrics={"datapoint": ['attributes["path"] == "/health"']})
    request = build(M, ({}, [[gauge("up", {"path": "/health"}, {"path": "/x"}),
                              counter("hits", {"path": "/health"})]]))  # fmt: skip
    out = processor.process(M, request)
    assert [m.name for m in items(M, out)] == ["up"]
    points = out.resource_metrics[0].scope_metrics[0].metrics[0].gauge.data_points
    assert [as_dict(p.attributes) for p in points] == [{"path": "/x"}]
    assert dropped(metrics, M, "filtered") == 2


def test_filter_metric_conditions_drop_whole_metrics(metrics) -> None:
    processor = _filter(metrics, metrics={"metric": ['name == "drop.me"', "type == METRIC_DATA_TYPE_SUM"]})
    request = build(M, ({}, [[gauge("drop.me", {}, {}, {}), gauge("keep", {"k": "v"}, {"k": "w"}),
                              counter("hits", {}, {})]]))  # fmt: skip
    out = processor.process(M, request)
    assert [m.name for m in items(M, out)] == ["keep"]
    assert count_items(out) == 2
    assert dropped(metrics, M, "filtered") == 5


def test_filter_metric_and_datapoint_conditions_together(metrics) -> None:
    processor = _filter(metrics, metrics={"metric": ['name == "a"'], "datapoint": ['attributes["k"] == "v"']})
    request = build(M, ({}, [[gauge("a", {"k": "w"}), gauge("b", {"k": "v"}, {"k": "w"}),
                              gauge("c", {"k": "v"})]]))  # fmt: skip
    out = processor.process(M, request)
    assert [(m.name, len(m.gauge.data_points)) for m in items(M, out)] == [("b", 1)]
    assert dropped(metrics, M, "filtered") == 3


BAD = "9" * 5000  # Int() of this raises ValueError (Python's int/str digit limit): a real evaluation error
INT_CONDITION = 'Int(attributes["n"]) > 0'


def test_filter_propagate_rejects_the_request(metrics) -> None:
    processor = _filter(metrics, traces={"span": [INT_CONDITION]})
    request = build(T, ({}, [[span("ok", n="5"), span("bad", n=BAD)]]))
    with pytest.raises(InvalidRequest) as err:
        processor.process(T, request)
    assert str(err.value) == (
        "filter: condition 'Int(attributes[\"n\"]) > 0' failed on a span: ValueError: Exceeds the "
        "limit (4300 digits) for integer string conversion: value has 5000 digits; use "
        "sys.set_int_max_str_digits() to increase the limit"
    )
    assert err.value.reason == "filter_error"
    assert dropped(metrics, T, "filtered") == 0


@pytest.mark.parametrize("mode", ["ignore", "silent"])
def test_filter_ignore_and_silent_keep_the_item(mode, metrics, caplog) -> None:
    processor = _filter(metrics, mode, traces={"span": [INT_CONDITION, 'name == "drop"']})
    request = build(T, ({}, [[span("drop", n=BAD), span("keep", n=BAD), span("gone", n="3"), span("z")]]))
    with caplog.at_level(logging.WARNING, logger="agents.processors.filter"):
        out = processor.process(T, request)
    # the failing condition counts as false; the other condition still drops "drop"
    assert [s.name for s in items(T, out)] == ["keep", "z"]
    assert dropped(metrics, T, "filtered") == 2
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == (2 if mode == "ignore" else 0)
    if mode == "ignore":
        assert warnings[0].startswith("filter: condition 'Int(attributes[\"n\"]) > 0' failed on a span: ")
        assert warnings[0].endswith("; the condition counts as false (error_mode: ignore)")
