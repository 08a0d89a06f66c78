"""Tenant routing's pure part: the header fast path, splits of mixed records, unknown and missing tenants."""

from __future__ import annotations

from typing import Any

import pytest

from kotel.kafka.topics import TopicNames
from kotel.otlp import OtlpDecodeError, Signal, count_items, decode_protobuf
from kotel.topology import parse_topology
from kotel.topology.processors import RoutingConfig
from streams.stages.routing_core import Part, Router, routing_input
from tests.unit.otlp_builders import as_dict, build, gauge, items, log, span

NAMES = TopicNames("kt")
TABLE = [{"value": t, "exporters": ["file/archive"]} for t in ("tenant-a", "tenant-b", "tenant-c")]
AGENT_HEADERS = [("kotel.tenant", b""), ("kotel.signal", b"traces"), ("kotel.schema", b"otlp-proto-v1"),
                 ("kotel.agent", b"node-1"), ("kotel.seq", b"42")]


def router(**options: Any) -> Router:
    return Router(RoutingConfig.model_validate({"table": TABLE, **options}), NAMES)


def with_tenant(tenant: str) -> list[tuple[str, bytes]]:
    return [(k, tenant.encode() if k == "kotel.tenant" else v) for k, v in AGENT_HEADERS]


def item(signal: Signal, name: str) -> Any:
    if signal is Signal.TRACES:
        return span(name)
    if signal is Signal.METRICS:
        return gauge(name, {"p": 1}, {"p": 2})
    return log(name)


def item_names(signal: Signal, request: Any) -> list[str]:
    if signal is Signal.LOGS:
        return [record.body.string_value for record in items(signal, request)]
    return [i.name for i in items(signal, request)]


def resource(signal: Signal, tenant: str | None, *names: str) -> tuple[dict[str, Any], list[list[Any]]]:
    attrs: dict[str, Any] = {"service.name": f"svc-{tenant}"}
    if tenant is not None:
        attrs["tenant"] = tenant
    return attrs, [[item(signal, n) for n in names]]


def test_known_tenant_header_forwards_the_bytes_without_parsing_them() -> None:
    not_otlp = b"\xff\xfe not a protobuf message"
    with pytest.raises(OtlpDecodeError):  # what a parse would have done with these bytes
        router().route(Signal.TRACES, not_otlp, with_tenant("tenant-x"))

    parts = router().route(Signal.TRACES, not_otlp, with_tenant("tenant-b"))

    assert parts == [Part("kt.tenant.tenant-b.traces", not_otlp, "tenant-b", with_tenant("tenant-b"), True)]
    assert parts[0].value is not_otlp


@pytest.mark.parametrize("signal", list(Signal))
def test_a_mixed_record_is_split_with_every_item_exactly_once(signal: Signal) -> None:
    request = build(signal, resource(signal, "tenant-a", "a1", "a2"), resource(signal, "tenant-b", "b1"),
                    resource(signal, "tenant-x", "x1"), resource(signal, "tenant-a", "a3"),
                    resource(signal, None, "n1", "n2"), resource(signal, "tenant-c", "c1"))
    wire = request.SerializeToString()
    headers = [(k, signal.value.encode() if k == "kotel.signal" else v) for k, v in AGENT_HEADERS]

    parts = router().route(signal, wire, headers)

    by_topic = {p.topic: p for p in parts}
    assert [(p.topic, p.tenant, p.routed) for p in parts] == [
        (f"kt.tenant.tenant-a.{signal}", "tenant-a", True),
        (f"kt.tenant.tenant-b.{signal}", "tenant-b", True),
        (f"kt.unrouted.{signal}", "tenant-x", False),
        (f"kt.unrouted.{signal}", "", False),
        (f"kt.tenant.tenant-c.{signal}", "tenant-c", True),
    ]
    decoded = {p.topic + "/" + p.tenant: decode_protobuf(signal, p.value) for p in parts}
    assert item_names(signal, decoded[f"kt.tenant.tenant-a.{signal}/tenant-a"]) == ["a1", "a2", "a3"]
    assert item_names(signal, decoded[f"kt.unrouted.{signal}/"]) == ["n1", "n2"]
    all_names = sorted(n for d in decoded.values() for n in item_names(signal, d))
    assert all_names == sorted(item_names(signal, request))
    assert sum(count_items(d) for d in decoded.values()) == count_items(request)
    # Entries are sliced, not re-encoded: the parts hold exactly the input's bytes.
    assert sum(len(p.value) for p in parts) == len(wire)
    # Every other header is kept, in its place; kotel.tenant names the part's tenant, or is gone.
    assert by_topic[f"kt.tenant.tenant-b.{signal}"].headers == [
        (k, b"tenant-b" if k == "kotel.tenant" else v) for k, v in headers]
    assert parts[2].headers == [(k, b"tenant-x" if k == "kotel.tenant" else v) for k, v in headers]
    assert parts[3].headers == [(k, v) for k, v in headers if k != "kotel.tenant"]


def test_a_record_of_one_tenant_without_the_header_is_forwarded_whole_and_labelled() -> None:
    wire = build(Signal.LOGS, resource(Signal.LOGS, "tenant-c", "l1"),
                 resource(Signal.LOGS, "tenant-c", "l2")).SerializeToString()

    parts = router().route("logs", wire, {"kotel.agent": b"collector"})

    assert parts == [Part("kt.tenant.tenant-c.logs", wire, "tenant-c",
                          [("kotel.agent", b"collector"), ("kotel.tenant", b"tenant-c")], True)]
    assert parts[0].value is wire


def test_a_header_naming_an_unknown_tenant_is_checked_against_the_data() -> None:
    wire = build(Signal.TRACES, resource(Signal.TRACES, "tenant-a", "s1")).SerializeToString()

    (part,) = router().route(Signal.TRACES, wire, with_tenant("tenant-zz"))

    assert (part.topic, part.tenant, part.routed) == ("kt.tenant.tenant-a.traces", "tenant-a", True)
    assert dict(part.headers)["kotel.tenant"] == b"tenant-a"


def test_an_unknown_tenant_goes_to_the_unrouted_topic_whole() -> None:
    wire = build(Signal.METRICS, resource(Signal.METRICS, "tenant-x", "m1", "m2")).SerializeToString()

    parts = router().route(Signal.METRICS, wire, None)

    assert parts == [Part("kt.unrouted.metrics", wire, "tenant-x", [("kotel.tenant", b"tenant-x")], False)]


def test_a_missing_tenant_goes_to_the_unrouted_topic_without_a_tenant_header() -> None:
    wire = build(Signal.TRACES, resource(Signal.TRACES, None, "s1")).SerializeToString()

    parts = router().route(Signal.TRACES, wire, with_tenant(""))

    assert parts == [Part("kt.unrouted.traces", wire, "", AGENT_HEADERS[1:], False)]


def test_a_tenant_attribute_that_is_not_a_string_counts_as_missing() -> None:
    wire = build(Signal.TRACES, ({"tenant": 7}, [[span("s1")]])).SerializeToString()

    (part,) = router().route(Signal.TRACES, wire, None)

    assert (part.topic, part.tenant) == ("kt.unrouted.traces", "")


def test_an_empty_request_is_unrouted_not_dropped() -> None:
    assert router().route(Signal.LOGS, b"", None) == [Part("kt.unrouted.logs", b"", "", [], False)]


@pytest.mark.parametrize(("value", "reason"), [
    (b"\xff\xfe not a protobuf message", "malformed wire format (truncated, or not a protobuf message)"),
    (b"\x0a\x05ab", "malformed wire format (truncated, or not a protobuf message)"),
])
def test_a_value_that_is_not_otlp_raises_for_the_dead_letter(value: bytes, reason: str) -> None:
    with pytest.raises(OtlpDecodeError) as caught:
        router().route(Signal.TRACES, value, with_tenant(""))
    assert str(caught.value) == f"invalid OTLP/protobuf ExportTraceServiceRequest: {reason}"


def test_unknown_top_level_fields_fall_back_to_re_encoding_entries() -> None:
    request = build(Signal.TRACES, resource(Signal.TRACES, "tenant-a", "s1"),
                    resource(Signal.TRACES, "tenant-b", "s2"))
    wire = request.SerializeToString() + b"\x10\x01"  # field 2 (varint): unknown to today's schema

    parts = router().route(Signal.TRACES, wire, None)

    decoded = [(p.tenant, item_names(Signal.TRACES, decode_protobuf(Signal.TRACES, p.value))) for p in parts]
    assert decoded == [("tenant-a", ["s1"]), ("tenant-b", ["s2"])]


def test_drop_resource_routing_attribute_removes_it_from_routed_entries_only() -> None:
    request = build(Signal.TRACES, resource(Signal.TRACES, "tenant-a", "s1"),
                    resource(Signal.TRACES, "tenant-x", "s2"))
    drop = router(drop_resource_routing_attribute=True)

    routed, unrouted = drop.route(Signal.TRACES, request.SerializeToString(), None)
    (fast,) = drop.route(Signal.TRACES, build(Signal.TRACES, resource(Signal.TRACES, "tenant-b", "s3"))
                         .SerializeToString(), with_tenant("tenant-b"))

    def resource_attrs(part: Part) -> list[dict[str, Any]]:
        request = decode_protobuf(Signal.TRACES, part.value)
        return [as_dict(r.resource.attributes) for r in request.resource_spans]

    assert resource_attrs(routed) == [{"service.name": "svc-tenant-a"}]
    assert resource_attrs(unrouted) == [{"service.name": "svc-tenant-x", "tenant": "tenant-x"}]
    assert fast.topic == "kt.tenant.tenant-b.traces"
    assert resource_attrs(fast) == [{"service.name": "svc-tenant-b"}]


def test_context_source_routes_by_header_alone() -> None:
    by_context = router(attribute_source="context")
    not_otlp = b"\xff\xfe"

    assert [p.topic for p in by_context.route(Signal.LOGS, not_otlp, {"tenant": b"tenant-c"})] == [
        "kt.tenant.tenant-c.logs"]
    assert [p.topic for p in by_context.route(Signal.LOGS, not_otlp, with_tenant("tenant-a"))] == [
        "kt.tenant.tenant-a.logs"]
    assert [(p.topic, p.tenant) for p in by_context.route(Signal.LOGS, not_otlp, None)] == [
        ("kt.unrouted.logs", "")]


GATEWAY = """
topics: {{prefix: kt}}
gateway:
  processors:
{processors}
    routing:
      table: [{{value: tenant-a, exporters: [file/archive]}}]
  exporters:
    file/archive: {{path: /tmp/archive}}
{service}
"""
TAIL = """    tail_sampling:
      policies: [{name: all, type: always_sample}]"""


@pytest.mark.parametrize(("processors", "service", "expected"), [
    (TAIL, "", {"traces": "kt.sampled.traces", "metrics": "kt.deduped.metrics", "logs": "kt.deduped.logs"}),
    ("    dedup: {}", "", {"traces": "kt.deduped.traces", "metrics": "kt.deduped.metrics",
                          "logs": "kt.deduped.logs"}),
    ("    dedup: {}", "  service:\n    pipelines:\n"
     "      logs: {processors: [routing], exporters: [file/archive]}\n"
     "      traces: {processors: [dedup], exporters: [file/archive]}",
     {"traces": None, "metrics": None, "logs": "kt.raw.logs"}),
])
def test_routing_reads_the_output_of_the_stage_before_it(processors: str, service: str,
                                                         expected: dict[str, str | None]) -> None:
    topology = parse_topology(GATEWAY.format(processors=processors, service=service))

    assert {s.value: routing_input(topology, s) for s in Signal} == expected


def test_no_routing_processor_means_no_routing_input() -> None:
    assert routing_input(parse_topology("topics: {prefix: kt}"), Signal.TRACES) is None
