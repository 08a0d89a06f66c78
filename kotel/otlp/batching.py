"""Partition keys, regrouping by key and merging of export requests.

Requests are regrouped at the resource level: a resource entry (resource + its scope groups) is the unit
that goes to one Kafka partition, so per-resource order is kept downstream.
"""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.message import Message
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from kotel.otlp.signals import Signal, signal_of

INSTANCE_ID = "service.instance.id"
SERVICE_NAME = "service.name"


def resource_key(resource: Resource, fallback: str) -> str:
    """The partition key: service.instance.id, else service.name, else fallback (string values only)."""
    name = ""
    for kv in resource.attributes:
        key = kv.key
        if key == INSTANCE_ID or (key == SERVICE_NAME and not name):
            value = kv.value
            if value.WhichOneof("value") == "string_value" and value.string_value:
                if key == INSTANCE_ID:
                    return value.string_value
                name = value.string_value
    return name or fallback


def split_by_key(signal: Signal, request: Message, fallback: str) -> dict[str, Message]:
    """Requests per partition key, in first-seen order; resource entries are moved whole, never merged.

    When every resource has the same key (the usual export from one SDK) the input request itself is
    returned, without a copy. An empty request gives an empty dict.
    """
    field = Signal(signal).resource_field
    entries = getattr(request, field)
    keys = [resource_key(entry.resource, fallback) for entry in entries]
    if not keys:
        return {}
    if all(k == keys[0] for k in keys):
        return {keys[0]: request}
    groups: dict[str, list[Message]] = {}
    for key, entry in zip(keys, entries, strict=True):
        groups.setdefault(key, []).append(entry)
    out: dict[str, Message] = {}
    for key, group in groups.items():
        part = type(request)()
        getattr(part, field).extend(group)
        out[key] = part
    return out


def merge_requests(signal: Signal, requests: Iterable[Message]) -> Message:
    """One request holding every resource entry of the given ones, in order."""
    sig = Signal(signal)
    out = sig.request_class()
    field = sig.resource_field
    for req in requests:
        if signal_of(req) is not sig:
            raise TypeError(f"cannot merge a {type(req).__name__} into a {sig} request")
        getattr(out, field).extend(getattr(req, field))
    return out
