"""The Collector's filter processor: drop spans, metric data points and log records matching OTTL conditions.

An item is dropped when ANY of its signal's conditions is true (filterprocessor semantics); metrics, scopes
and resources left empty are removed. Conditions run as one compiled OR over each scope's items; only when
that raises does the scope run again condition by condition, to name the failing condition (``propagate``)
or to treat it as false and keep going (``ignore``/``silent``), as the Collector's OTTL error modes do.

``metric`` conditions run in OTTL's metric context (``name == "x"``, ``type == METRIC_DATA_TYPE_SUM``)
and drop whole metrics, counting all their data points.

This module also holds the small in-place deletion helpers the other dropping processors share.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message
from opentelemetry.proto.metrics.v1 import metrics_pb2

from agents.contracts import InvalidRequest
from agents.telemetry import AgentMetrics
from kotel.otlp import Signal
from kotel.ottl import Context, compile_condition, compile_conditions
from kotel.topology.processors import FilterConfig

log = logging.getLogger(__name__)

Test = Callable[..., bool]  # (item, scope, resource, metric) -> bool


# --- shared helpers -----------------------------------------------------------------------------------


def remove_indices(items: Any, indices: Sequence[int]) -> None:
    """Delete ``items[i]`` for ascending ``indices``, back to front so the earlier ones stay valid.

    upb deletes in place; rebuilding the list instead would copy every message that is kept.
    """
    for index in reversed(indices):
        del items[index]


def data_points(metric: metrics_pb2.Metric) -> Any:
    """The repeated data points of whichever kind the metric holds (an empty tuple for none)."""
    kind = metric.WhichOneof("data")
    return getattr(metric, kind).data_points if kind else ()


def prune(signal: Signal, request: Message) -> Message | None:
    """Remove scope entries without items and resource entries without scopes; None once nothing is left."""
    entries = getattr(request, signal.resource_field)
    scope_field, item_field = signal.scope_field, signal.item_field
    empty_entries = []
    for index, entry in enumerate(entries):
        scopes = getattr(entry, scope_field)
        remove_indices(scopes, [i for i, scope in enumerate(scopes) if not len(getattr(scope, item_field))])
        if not len(scopes):
            empty_entries.append(index)
    remove_indices(entries, empty_entries)
    return request if len(entries) else None


def count_dropped(metrics: AgentMetrics, signal: Signal, reason: str, count: int) -> None:
    if count:
        metrics.dropped.labels(signal=signal.value, reason=reason).inc(count)


# --- the filter processor -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Rule:
    text: str
    test: Test


@dataclass(frozen=True, slots=True)
class _Group:
    """The conditions of one kind: a compiled OR for the fast path, each alone to attribute errors."""

    rules: tuple[_Rule, ...]
    any: Test
    item_name: str

    @classmethod
    def compile(cls, texts: Sequence[str], context: Context, item_name: str) -> _Group | None:
        if not texts:
            return None
        rules = tuple(_Rule(text, compile_condition(text, context)) for text in texts)
        return cls(rules, compile_conditions(texts, context), item_name)


class FilterProcessor:
    def __init__(self, config: FilterConfig, metrics: AgentMetrics, name: str = "filter") -> None:
        self.name = name
        self._metrics = metrics
        self._mode = config.error_mode
        self._spans = _Group.compile(config.traces.span, "span", "span")
        self._logs = _Group.compile(config.logs.log_record, "log", "log record")
        self._points = _Group.compile(config.metrics.datapoint, "datapoint", "data point")
        self._metric = _Group.compile(config.metrics.metric, "metric", "metric")

    def process(self, signal: Signal, request: Message) -> Message | None:
        if signal is Signal.METRICS:
            if self._metric is None and self._points is None:
                return request
            dropped = self._filter_metrics(request)
        else:
            group = self._spans if signal is Signal.TRACES else self._logs
            if group is None:
                return request
            dropped = self._filter_items(signal, request, group)
        if not dropped:
            return request
        count_dropped(self._metrics, signal, "filtered", dropped)
        return prune(signal, request)

    def _filter_items(self, signal: Signal, request: Message, group: _Group) -> int:
        dropped = 0
        scope_field, item_field = signal.scope_field, signal.item_field
        for entry in getattr(request, signal.resource_field):
            resource = entry.resource
            for scope_entry in getattr(entry, scope_field):
                items = getattr(scope_entry, item_field)
                drop = self._matching(group, items, scope_entry.scope, resource)
                remove_indices(items, drop)
                dropped += len(drop)
        return dropped

    def _filter_metrics(self, request: Message) -> int:
        dropped = 0
        for entry in request.resource_metrics:
            resource = entry.resource
            for scope_entry in entry.scope_metrics:
                scope, metrics = scope_entry.scope, scope_entry.metrics
                gone: list[int] = []
                if self._metric is not None:
                    gone = self._matching(self._metric, metrics, scope, resource)
                    dropped += sum(len(data_points(metrics[i])) for i in gone)
                if self._points is not None:
                    skip = set(gone)
                    for index, metric in enumerate(metrics):
                        if index in skip:
                            continue
                        points = data_points(metric)
                        drop = self._matching(self._points, points, scope, resource, metric)
                        remove_indices(points, drop)
                        dropped += len(drop)
                        if not len(points):  # as the Collector: a metric without data points goes too
                            skip.add(index)
                    gone = sorted(skip)
                remove_indices(metrics, gone)
        return dropped

    def _matching(
        self, group: _Group, items: Any, scope: Any, resource: Any, metric: Any = None
    ) -> list[int]:
        """Indices of the items the group matches; a failing condition falls back to the slow path."""
        test = group.any
        try:
            return [i for i, item in enumerate(items) if test(item, scope, resource, metric)]
        except Exception:
            return [i for i, item in enumerate(items) if self._slow(group, item, scope, resource, metric)]

    def _slow(self, group: _Group, item: Any, scope: Any, resource: Any, metric: Any) -> bool:
        for rule in group.rules:
            try:
                if rule.test(item, scope, resource, metric):
                    return True
            except Exception as exc:
                message = (f"{self.name}: condition {rule.text!r} failed on a {group.item_name}: "
                           f"{type(exc).__name__}: {exc}")
                if self._mode == "propagate":
                    raise InvalidRequest(message, reason="filter_error") from exc
                if self._mode == "ignore":
                    log.warning("%s; the condition counts as false (error_mode: ignore)", message)
        return False
