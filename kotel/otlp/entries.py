"""Resource entries as protobuf bytes: batching by concatenation instead of message copies.

An Export*ServiceRequest is nothing but its repeated resource field (number 1 in all three), so the
bytes of a request holding entries e1..en are the framed bytes of e1..en concatenated. The agent
serializes each resource entry once after its processors, groups the bytes per Kafka key, and builds
records by joining them; merging and regrouping messages (CopyFrom) was the dearest step of the hot
path (profiled with loadtest/agent_bench.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from google.protobuf.message import Message

from kotel.otlp.signals import Signal, metric_data_points
from kotel.otlp.sizing import encode_varint

_RESOURCE_TAG = b"\x0a"  # field 1, wire type 2, in all three request messages


def frame(entry: bytes) -> bytes:
    """One serialized resource entry as it sits inside a request."""
    return _RESOURCE_TAG + encode_varint(len(entry)) + entry


@dataclass(frozen=True, slots=True)
class Entry:
    """One resource entry of a request: its Kafka key, its tenant label, its framed bytes and size."""

    key: str
    tenant: str
    framed: bytes
    items: int


def entries(signal: Signal, request: Message, fallback_key: str, tenant_attribute: str,
            key_attribute: str = "service.instance.id") -> Iterator[Entry]:
    """Each resource entry with items; key: ``key_attribute``, else ``service.name``, else the fallback."""
    scope_field, item_field = signal.scope_field, signal.item_field
    for res in getattr(request, signal.resource_field):
        if signal is Signal.METRICS:
            items = sum(len(metric_data_points(m)) for s in res.scope_metrics for m in s.metrics)
        else:
            items = sum(len(getattr(s, item_field)) for s in getattr(res, scope_field))
        if not items:
            continue
        key = tenant = ""
        service = ""
        for kv in res.resource.attributes:
            name = kv.key
            if name == key_attribute:
                key = kv.value.string_value
            elif name == tenant_attribute:
                tenant = kv.value.string_value
            elif name == "service.name":
                service = kv.value.string_value
        yield Entry(key or service or fallback_key, tenant, frame(res.SerializeToString()), items)


def join(framed: Iterable[bytes]) -> bytes:
    """The request whose resource entries are these, in this order, as protobuf bytes."""
    return b"".join(framed)
