"""The Collector's resource processor (its attribute actions on each resource) plus kotel's tenant rule.

Actions run in order on every resource entry: ``insert`` (only when the key is absent), ``update`` (only when
present), ``upsert``, ``delete`` and ``hash``; ``value`` keeps its YAML type (str, int, float, bool), and a
``from_attribute`` that the resource lacks makes the action a no-op, as in the Collector.

Tenant rule: an application must not choose its tenant. Every action on the tenancy attribute, whatever it
says, leaves the agent's configured value in place; a resource that arrived with another value (or with the
key twice) is overwritten and counted once in ``tenant_overwrites``. The configured value must therefore be
a constant string ``value``; anything else is refused when the processor is built.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from agents.processors.filter import remove_indices
from agents.telemetry import AgentMetrics
from kotel.otlp import Signal
from kotel.otlp.attributes import any_value
from kotel.topology.processors import ResourceConfig

# The hash action's digest: SHA-256, as the Collector's attributes processor uses today (SHA-1 before).
HASH = hashlib.sha256


def hash_value(value: AnyValue) -> None:
    """Replace a value by the hex digest of its bytes, as the Collector's hasher does.

    Strings hash their UTF-8, bools one byte, ints and doubles their 8 little-endian bytes; any other type
    (and the empty string) has nothing to hash and becomes "".
    """
    kind = value.WhichOneof("value")
    if kind == "string_value":
        data = value.string_value.encode()
    elif kind == "bool_value":
        data = b"\x01" if value.bool_value else b"\x00"
    elif kind == "int_value":
        data = struct.pack("<q", value.int_value)
    elif kind == "double_value":
        data = struct.pack("<d", value.double_value)
    else:
        data = b""
    value.string_value = HASH(data).hexdigest() if data else ""


@dataclass(frozen=True, slots=True)
class _Action:
    key: str
    kind: str  # insert / update / upsert / delete / hash / tenant
    value: AnyValue | None = None
    from_attribute: str | None = None


def _positions(attributes: Any, key: str) -> list[int]:
    return [i for i, kv in enumerate(attributes) if kv.key == key]


class ResourceProcessor:
    def __init__(
        self,
        config: ResourceConfig,
        metrics: AgentMetrics,
        name: str = "resource",
        tenancy_attribute: str = "tenant",
    ) -> None:
        self.name = name
        self._metrics = metrics
        self._tenant_key = tenancy_attribute
        self._tenant: AnyValue | None = None
        actions = []
        for act in config.attributes:
            if act.key == tenancy_attribute:
                self._set_tenant(act.action, act.value)
                actions.append(_Action(act.key, "tenant"))
            else:
                value = None if act.value is None else any_value(act.value)
                actions.append(_Action(act.key, act.action, value, act.from_attribute))
        self._actions = tuple(actions)

    def _set_tenant(self, action: str, value: object) -> None:
        where = f"{self.name}: the tenancy attribute {self._tenant_key!r}"
        if not isinstance(value, str) or not value:
            got = "no value" if value is None else f"{type(value).__name__} {value!r}"
            raise ValueError(
                f"{where} must be set from a constant string 'value' (the agent enforces it whatever the "
                f"action says); action {action!r} has {got}"
            )
        if self._tenant is not None and self._tenant.string_value != value:
            raise ValueError(f"{where} is set to two values: {self._tenant.string_value!r} and {value!r}")
        self._tenant = AnyValue(string_value=value)

    def process(self, signal: Signal, request: Message) -> Message | None:
        overwrites = 0
        for entry in getattr(request, signal.resource_field):
            overwrites += self._apply(entry.resource.attributes)
        if overwrites:
            self._metrics.tenant_overwrites.labels(signal=signal.value).inc(overwrites)
        return request

    def _apply(self, attributes: Any) -> int:
        """Run the actions on one resource; 1 when its tenant had to be overwritten, else 0."""
        overwritten = 0
        for act in self._actions:
            kind = act.kind
            if kind == "tenant":
                overwritten |= self._enforce_tenant(attributes)
                continue
            found = _positions(attributes, act.key)
            if kind == "delete":
                remove_indices(attributes, found)
                continue
            if kind == "hash":
                if found:
                    hash_value(attributes[found[0]].value)
                continue
            source = act.value
            if source is None:
                origin = _positions(attributes, act.from_attribute or "")
                if not origin:
                    continue
                source = AnyValue()
                source.CopyFrom(attributes[origin[0]].value)  # a copy: adding to the list may move it
            if found and kind in ("update", "upsert"):
                attributes[found[0]].value.CopyFrom(source)
            elif not found and kind in ("insert", "upsert"):
                attributes.add(key=act.key).value.CopyFrom(source)
        return overwritten

    def _enforce_tenant(self, attributes: Any) -> int:
        tenant = self._tenant
        assert tenant is not None  # set whenever a "tenant" action exists
        found = _positions(attributes, self._tenant_key)
        if not found:
            attributes.add(key=self._tenant_key).value.CopyFrom(tenant)
            return 0
        if len(found) == 1 and attributes[found[0]].value == tenant:
            return 0
        remove_indices(attributes, found[1:])
        attributes[found[0]].value.CopyFrom(tenant)
        return 1
