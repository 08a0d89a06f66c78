"""The Collector's groupbyattrs processor: move record attributes up to the resource, and compact.

Each span, log record or metric data point carrying one of ``keys`` loses those attributes, and lands under
a resource entry made of its original resource's attributes plus the moved ones; records whose resource
(attributes, dropped count, schema URL) and scope (name, version, attributes, schema URL) end up equal share
one resource entry and one scope entry, and metrics with the same identity (name, description, unit, type,
temporality, monotonicity, metadata) share one metric. With no keys this is the Collector's compaction.

The usual request (one SDK, the key already on the resource, nothing to merge) is returned untouched without
copying; otherwise a new request is built, which copies every item once. To avoid a Python scan of every
record's attributes, a scope is only scanned when one of the keys occurs somewhere in its wire bytes.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.message import Message
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2

from agents.processors.filter import data_points, remove_indices
from agents.telemetry import AgentMetrics
from kotel.otlp import Signal
from kotel.topology.processors import GroupByAttrsConfig

Pulled = tuple[tuple[str, AnyValue], ...]
Identity = tuple[Any, ...]


def _attributes_identity(attributes: Any) -> tuple[tuple[str, bytes], ...]:
    """Order-insensitive, as pdata's Map equality."""
    return tuple(sorted((kv.key, kv.value.SerializeToString(deterministic=True)) for kv in attributes))


def _resource_identity(entry: Any, signature: tuple[tuple[str, bytes], ...] = ()) -> Identity:
    """A resource entry's identity once the ``signature`` attributes (key, serialized value) are upserted."""
    attributes = _attributes_identity(entry.resource.attributes)
    if signature:
        merged = dict(attributes)
        merged.update(signature)
        attributes = tuple(sorted(merged.items()))
    return attributes, entry.resource.dropped_attributes_count, entry.schema_url


def _scope_identity(scope_entry: Any) -> Identity:
    s = scope_entry.scope
    return (s.name, s.version, _attributes_identity(s.attributes), s.dropped_attributes_count,
            scope_entry.schema_url)  # fmt: skip


def _metric_identity(metric: metrics_pb2.Metric) -> Identity:
    kind = metric.WhichOneof("data")
    part = getattr(metric, kind) if kind else None
    return (metric.name, metric.description, metric.unit, kind,
            getattr(part, "aggregation_temporality", None), getattr(part, "is_monotonic", None),
            _attributes_identity(metric.metadata))  # fmt: skip


def _fill_shell(dest: metrics_pb2.Metric, metric: metrics_pb2.Metric) -> None:
    """Copy a metric's description and type into ``dest``, without its data points."""
    dest.name, dest.description, dest.unit = metric.name, metric.description, metric.unit
    dest.metadata.extend(metric.metadata)
    kind = metric.WhichOneof("data")
    if kind:
        source, target = getattr(metric, kind), getattr(dest, kind)
        target.SetInParent()
        for field in source.DESCRIPTOR.fields:
            if field.name != "data_points":
                setattr(target, field.name, getattr(source, field.name))


class _Targets:
    """The output request's resource and scope entries, found or created by identity."""

    def __init__(self, signal: Signal, out: Message) -> None:
        self._entries = getattr(out, signal.resource_field)
        self._scope_field = signal.scope_field
        self._resources: dict[Identity, Any] = {}
        self._scopes: dict[tuple[Identity, Identity], Any] = {}
        self._metrics: dict[tuple[int, Identity], metrics_pb2.Metric] = {}
        self._identities: dict[tuple[int, tuple[tuple[str, bytes], ...]], Identity] = {}

    def scope(self, index: int, entry: Any, pulled: Pulled, scope_entry: Any, scope_id: Identity) -> Any:
        signature = tuple((k, v.SerializeToString(deterministic=True)) for k, v in pulled)
        res_id = self._identities.get((index, signature))
        if res_id is None:
            res_id = self._identities[(index, signature)] = _resource_identity(entry, signature)
        target = self._resources.get(res_id)
        if target is None:
            target = self._resources[res_id] = self._entries.add()
            target.resource.CopyFrom(entry.resource)
            target.schema_url = entry.schema_url
            _upsert(target.resource.attributes, pulled)
        dest = self._scopes.get((res_id, scope_id))
        if dest is None:
            dest = self._scopes[(res_id, scope_id)] = getattr(target, self._scope_field).add()
            dest.scope.CopyFrom(scope_entry.scope)
            dest.schema_url = scope_entry.schema_url
        return dest

    def metric(self, dest_scope: Any, metric: metrics_pb2.Metric, metric_id: Identity) -> metrics_pb2.Metric:
        key = (id(dest_scope), metric_id)
        found = self._metrics.get(key)
        if found is None:
            found = self._metrics[key] = dest_scope.metrics.add()
            _fill_shell(found, metric)
        return found


def _upsert(attributes: Any, pulled: Pulled) -> None:
    for key, value in pulled:
        for kv in attributes:
            if kv.key == key:
                kv.value.CopyFrom(value)
                break
        else:
            attributes.add(key=key).value.CopyFrom(value)


class GroupByAttrsProcessor:
    def __init__(self, config: GroupByAttrsConfig, metrics: AgentMetrics, name: str = "groupbyattrs") -> None:
        self.name = name
        self._keys = frozenset(config.keys)
        self._needles = tuple(key.encode() for key in dict.fromkeys(config.keys))

    def process(self, signal: Signal, request: Message) -> Message | None:
        moves = self._pull_all(signal, request)
        if not moves and self._already_grouped(signal, request):
            return request
        out = signal.request_class()
        targets = _Targets(signal, out)
        scope_field = signal.scope_field
        for index, entry in enumerate(getattr(request, signal.resource_field)):
            for s_index, scope_entry in enumerate(getattr(entry, scope_field)):
                scope_id = _scope_identity(scope_entry)
                found = moves.get((index, s_index), {})
                if signal is Signal.METRICS:
                    self._regroup_points(targets, index, entry, scope_entry, scope_id, found)
                    continue
                records = getattr(scope_entry, signal.item_field)
                if not found:
                    dest = targets.scope(index, entry, (), scope_entry, scope_id)
                    getattr(dest, signal.item_field).extend(records)
                    continue
                for r_index, record in enumerate(records):
                    dest = targets.scope(index, entry, found.get(r_index, ()), scope_entry, scope_id)
                    getattr(dest, signal.item_field).append(record)
        return out

    def _regroup_points(
        self, targets: _Targets, index: int, entry: Any, scope_entry: Any, scope_id: Identity,
        found: dict[int, Pulled],
    ) -> None:
        """Data points: ``found`` is keyed by the point's position across the scope's metrics, in order."""
        position = 0
        for metric in scope_entry.metrics:
            metric_id = _metric_identity(metric)
            points = data_points(metric)
            if not any(position + i in found for i in range(len(points))):
                dest_scope = targets.scope(index, entry, (), scope_entry, scope_id)
                dest = targets.metric(dest_scope, metric, metric_id)
                if len(points):  # a metric without a data kind has no list to extend
                    data_points(dest).extend(points)
                position += len(points)
                continue
            for point in points:
                dest_scope = targets.scope(index, entry, found.get(position, ()), scope_entry, scope_id)
                data_points(targets.metric(dest_scope, metric, metric_id)).append(point)
                position += 1

    def _pull_all(self, signal: Signal, request: Message) -> dict[tuple[int, int], dict[int, Pulled]]:
        """Remove the keys from every record carrying them; what each record gave, by scope and position."""
        moves: dict[tuple[int, int], dict[int, Pulled]] = {}
        if not self._keys:
            return moves
        for index, entry in enumerate(getattr(request, signal.resource_field)):
            for s_index, scope_entry in enumerate(getattr(entry, signal.scope_field)):
                wire = scope_entry.SerializeToString()
                if not any(needle in wire for needle in self._needles):
                    continue
                if signal is Signal.METRICS:
                    records: Any = [p for metric in scope_entry.metrics for p in data_points(metric)]
                else:
                    records = getattr(scope_entry, signal.item_field)
                found = {}
                for r_index, record in enumerate(records):
                    pulled = self._pull(record.attributes)
                    if pulled:
                        found[r_index] = pulled
                if found:
                    moves[(index, s_index)] = found
        return moves

    def _pull(self, attributes: Any) -> Pulled:
        hits = [i for i, kv in enumerate(attributes) if kv.key in self._keys]
        if not hits:
            return ()
        pulled: dict[str, AnyValue] = {}
        for i in hits:
            value = AnyValue()
            value.CopyFrom(attributes[i].value)
            pulled[attributes[i].key] = value
        remove_indices(attributes, hits)
        return tuple(sorted(pulled.items(), key=lambda item: item[0]))

    @staticmethod
    def _already_grouped(signal: Signal, request: Message) -> bool:
        """True when no two resources, no two scopes of a resource, and no two metrics of a scope match."""
        resources: set[Identity] = set()
        for entry in getattr(request, signal.resource_field):
            res_id = _resource_identity(entry)
            if res_id in resources:
                return False
            resources.add(res_id)
            scopes: set[Identity] = set()
            for scope_entry in getattr(entry, signal.scope_field):
                scope_id = _scope_identity(scope_entry)
                if scope_id in scopes:
                    return False
                scopes.add(scope_id)
                if signal is Signal.METRICS:
                    metric_ids = [_metric_identity(m) for m in scope_entry.metrics]
                    if len(set(metric_ids)) != len(metric_ids):
                        return False
        return True
