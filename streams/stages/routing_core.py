"""Tenant routing as a pure function over record bytes (seed §4.2), unit-tested without a broker.

A record whose ``kotel.tenant`` header names a known tenant is forwarded as the very bytes it came
in: the agent sets that header only when every resource of the record has that one tenant, and the
parse it saves is most of a router's cost. Anything else is parsed (which also proves it is OTLP),
and its resource entries are regrouped per tenant by slicing the input's wire form: a request is
nothing but its framed resource entries (kotel.otlp.entries), so a part is the join of its entries'
slices and no message is copied or re-encoded. Unknown and missing tenants go to the unrouted topic.

With ``drop_resource_routing_attribute`` every record is parsed (the attribute must be cut out of
the routed entries; unrouted ones keep it, to show what was unknown). With ``attribute_source:
context`` the tenant is the record's header named ``from_attribute``, else kotel.tenant, and the
value is never parsed, as the Collector's routing processor reads context from request metadata.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from kotel.kafka.topics import TopicNames
from kotel.otlp import Signal, decode_protobuf, frame, join
from kotel.otlp.sizing import read_varint
from kotel.topology import Topology
from kotel.topology.processors import RoutingConfig

TENANT_HEADER = "kotel.tenant"

Headers = list[tuple[str, bytes]]
HeadersArg = Sequence[tuple[str, bytes]] | Mapping[str, bytes] | None


class Part(NamedTuple):
    """One output record: where it goes, its value, the tenant its data names, its headers.

    ``tenant`` is "" when the data names none (a non-string attribute counts as none); ``routed``
    is False for the unrouted topic.
    """

    topic: str
    value: bytes
    tenant: str
    headers: Headers
    routed: bool


class Router:
    """Routes the records of one topology; build once per worker, call ``route`` per record."""

    def __init__(self, routing: RoutingConfig, names: TopicNames) -> None:
        self._attribute = routing.from_attribute
        self._from_context = routing.attribute_source == "context"
        self._drop = routing.drop_resource_routing_attribute and not self._from_context
        self._names = names
        self._topics: dict[tuple[str, str], str] = {
            (tenant, signal.value): names.tenant(tenant, signal.value)
            for tenant in routing.tenants for signal in Signal
        }
        self.tenants = frozenset(routing.tenants)

    def route(self, signal: Signal | str, value: bytes, headers: HeadersArg = None) -> list[Part]:
        """The records ``value`` becomes; every resource entry lands in exactly one of them.

        Raises kotel.otlp.OtlpDecodeError (a ValueError) when the value has to be parsed and is not
        an OTLP export request of ``signal``; the caller dead-letters it.
        """
        sig = Signal(signal)
        hdrs = _header_list(headers)
        claimed = _header(hdrs, TENANT_HEADER)
        if self._from_context:
            # The Collector's "context" is the request's metadata; for a Kafka record, its headers.
            tenant = _header(hdrs, self._attribute) or claimed
            return [self._part(sig, tenant, value, hdrs)]
        if not self._drop and (claimed, sig.value) in self._topics:
            return [Part(self._topics[claimed, sig.value], value, claimed, hdrs, True)]
        return self._split(sig, value, hdrs)

    def _split(self, sig: Signal, value: bytes, hdrs: Headers) -> list[Part]:
        request = decode_protobuf(sig, value)
        resources: Any = getattr(request, sig.resource_field)
        if not resources:
            return [self._part(sig, "", value, hdrs)]
        slices = _entry_slices(value, len(resources))
        groups: dict[str, list[bytes | memoryview]] = {}
        changed = False
        for index, res in enumerate(resources):
            tenant = self._tenant_of(res.resource.attributes)
            known = (tenant, sig.value) in self._topics
            if self._drop and known:
                _remove(res.resource.attributes, self._attribute)
                framed: bytes | memoryview = frame(res.SerializeToString())
                changed = True
            elif slices is None:
                framed = frame(res.SerializeToString())
            else:
                framed = slices[index]
            groups.setdefault(tenant, []).append(framed)
        if len(groups) == 1 and not changed:
            tenant = next(iter(groups))
            return [self._part(sig, tenant, value, hdrs)]
        return [self._part(sig, tenant, join(framed), hdrs) for tenant, framed in groups.items()]

    def _tenant_of(self, attributes: Any) -> str:
        for kv in attributes:
            if kv.key == self._attribute:
                return str(kv.value.string_value)
        return ""

    def _part(self, sig: Signal, tenant: str, value: bytes, hdrs: Headers) -> Part:
        topic = self._topics.get((tenant, sig.value))
        routed = topic is not None
        return Part(topic or self._names.unrouted(sig.value), value, tenant, _with_tenant(hdrs, tenant),
                    routed)


def routing_input(topology: Topology, signal: Signal | str) -> str | None:
    """The topic the routing stage reads for ``signal``; None when the signal's chain has no routing.

    Routing reads the output of the nearest stage before it that writes a topic (tail sampling for
    traces when configured, else dedup), or the raw topic when routing comes first.
    """
    gateway = topology.gateway
    sig = Signal(signal)
    if gateway is None or gateway.routing is None:
        return None
    chain = gateway.stage_chain(sig.value)
    if "routing" not in chain:
        return None
    before = chain[: chain.index("routing")]
    names = topology.topic_names
    for stage in reversed(before):
        if stage == "tail_sampling" and sig is Signal.TRACES:
            return names.sampled_traces
        if stage == "dedup":
            return names.deduped(sig.value)
    return names.raw(sig.value)


def _header_list(headers: HeadersArg) -> Headers:
    if headers is None:
        return []
    if isinstance(headers, Mapping):
        return list(headers.items())
    return list(headers)


def _header(headers: Headers, name: str) -> str:
    for key, raw in headers:
        if key == name:
            return raw.decode("utf-8", "replace") if raw else ""
    return ""


def _with_tenant(headers: Headers, tenant: str) -> Headers:
    """The headers, in their order, with kotel.tenant naming ``tenant`` (none when the data names none)."""
    value = tenant.encode()
    out: Headers = []
    placed = not tenant
    for key, raw in headers:
        if key != TENANT_HEADER:
            out.append((key, raw))
        elif not placed:
            out.append((key, value))
            placed = True
    if not placed:
        out.append((TENANT_HEADER, value))
    return out


def _remove(attributes: Any, key: str) -> None:
    for index in range(len(attributes) - 1, -1, -1):
        if attributes[index].key == key:
            del attributes[index]


def _entry_slices(wire: bytes, expected: int) -> list[memoryview] | None:
    """The framed resource entries of an already parsed request, as views into its bytes.

    None when the request holds anything but field 1 (unknown fields a newer producer wrote): the
    caller then re-encodes entries instead, so nothing it did not understand is silently mixed in.
    """
    view = memoryview(wire)
    out: list[memoryview] = []
    pos, end = 0, len(wire)
    while pos < end:
        if view[pos] != 0x0A:  # field 1, length-delimited
            return None
        length, payload = read_varint(view, pos + 1)
        out.append(view[pos: payload + length])
        pos = payload + length
    return out if len(out) == expected else None


