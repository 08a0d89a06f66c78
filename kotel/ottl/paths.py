"""Path and enum tables per OTTL context, resolved at compile time into getters.

A getter is ``(item, scope, resource, metric) -> value``; each is one small closure so evaluation never
looks a path up by name. Names follow the Collector's ottlspan/ottllog/ottldatapoint/ottlmetric contexts.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from opentelemetry.proto.logs.v1 import logs_pb2
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from kotel.ottl.parser import OttlError, PathRef
from kotel.ottl.values import (
    descend,
    find,
    find_nested,
    id_hex,
    map_to_python,
    to_python,
    trace_state_entry,
)

Getter = Callable[..., Any]  # (item, scope, resource, metric=None) -> value
CONTEXTS = ("span", "datapoint", "log", "metric")

_NumberDP = metrics_pb2.NumberDataPoint
_SummaryDP = metrics_pb2.SummaryDataPoint
_ExpHistDP = metrics_pb2.ExponentialHistogramDataPoint
_METRIC_TYPES = {"gauge": 1, "sum": 2, "histogram": 3, "exponential_histogram": 4, "summary": 5}
_TEMPORAL = frozenset({"sum", "histogram", "exponential_histogram"})


# --- metric helpers (shared by the datapoint context, via ``metric``, and the metric context) ------------


def _metric_type(metric: metrics_pb2.Metric | None) -> int | None:
    return None if metric is None else _METRIC_TYPES.get(metric.WhichOneof("data") or "", 0)


def _temporality(metric: metrics_pb2.Metric | None) -> int | None:
    if metric is None:
        return None
    kind = metric.WhichOneof("data")
    return getattr(metric, kind).aggregation_temporality if kind in _TEMPORAL else 0


def _monotonic(metric: metrics_pb2.Metric | None) -> bool | None:
    return None if metric is None else metric.sum.is_monotonic


def _optional(field: str) -> Getter:
    """Histogram sum/min/max are proto3 ``optional``: unset reads as nil rather than 0."""

    def get(i: Any, s: Any, r: Any, m: Any = None) -> Any:
        kind = type(i)
        if kind is _SummaryDP:
            return i.sum if field == "sum" else None
        if kind is _NumberDP or not i.HasField(field):
            return None
        return getattr(i, field)

    return get


def _metric_paths(via: Callable[[Any, Any], Any]) -> dict[str, Getter]:
    """``via(item, metric)`` picks the Metric: the item itself in the metric context, else ``metric``."""
    return {
        "name": lambda i, s, r, m=None: None if (x := via(i, m)) is None else x.name,
        "description": lambda i, s, r, m=None: None if (x := via(i, m)) is None else x.description,
        "unit": lambda i, s, r, m=None: None if (x := via(i, m)) is None else x.unit,
        "type": lambda i, s, r, m=None: _metric_type(via(i, m)),
        "aggregation_temporality": lambda i, s, r, m=None: _temporality(via(i, m)),
        "is_monotonic": lambda i, s, r, m=None: _monotonic(via(i, m)),
    }


# --- scalar paths ---------------------------------------------------------------------------------------

_COMMON: dict[str, Getter] = {
    "resource.dropped_attributes_count": lambda i, s, r, m=None: r.dropped_attributes_count,
    "instrumentation_scope.name": lambda i, s, r, m=None: s.name,
    "instrumentation_scope.version": lambda i, s, r, m=None: s.version,
    "instrumentation_scope.dropped_attributes_count": lambda i, s, r, m=None: s.dropped_attributes_count,
}

_IDS: dict[str, Getter] = {
    "trace_id": lambda i, s, r, m=None: i.trace_id,
    "trace_id.string": lambda i, s, r, m=None: id_hex(i.trace_id),
    "span_id": lambda i, s, r, m=None: i.span_id,
    "span_id.string": lambda i, s, r, m=None: id_hex(i.span_id),
}

_SPAN: dict[str, Getter] = {
    **_IDS,
    "parent_span_id": lambda i, s, r, m=None: i.parent_span_id,
    "parent_span_id.string": lambda i, s, r, m=None: id_hex(i.parent_span_id),
    "trace_state": lambda i, s, r, m=None: i.trace_state,
    "name": lambda i, s, r, m=None: i.name,
    "kind": lambda i, s, r, m=None: i.kind,
    "status.code": lambda i, s, r, m=None: i.status.code,
    "status.message": lambda i, s, r, m=None: i.status.message,
    "start_time_unix_nano": lambda i, s, r, m=None: i.start_time_unix_nano,
    "end_time_unix_nano": lambda i, s, r, m=None: i.end_time_unix_nano,
    "dropped_attributes_count": lambda i, s, r, m=None: i.dropped_attributes_count,
    "dropped_events_count": lambda i, s, r, m=None: i.dropped_events_count,
    "dropped_links_count": lambda i, s, r, m=None: i.dropped_links_count,
    "flags": lambda i, s, r, m=None: i.flags,
}

_LOG: dict[str, Getter] = {
    **_IDS,
    "time_unix_nano": lambda i, s, r, m=None: i.time_unix_nano,
    "observed_time_unix_nano": lambda i, s, r, m=None: i.observed_time_unix_nano,
    "severity_number": lambda i, s, r, m=None: i.severity_number,
    "severity_text": lambda i, s, r, m=None: i.severity_text,
    "dropped_attributes_count": lambda i, s, r, m=None: i.dropped_attributes_count,
    "flags": lambda i, s, r, m=None: i.flags,
    "event_name": lambda i, s, r, m=None: i.event_name,
}

_DATAPOINT: dict[str, Getter] = {
    **{f"metric.{k}": g for k, g in _metric_paths(lambda i, m: m).items()},
    # As pdata: value_int/value_double read the NumberDataPoint's int/double (0 when it holds the other).
    "value_int": lambda i, s, r, m=None: i.as_int if type(i) is _NumberDP else None,
    "value_double": lambda i, s, r, m=None: i.as_double if type(i) is _NumberDP else None,
    "start_time_unix_nano": lambda i, s, r, m=None: i.start_time_unix_nano,
    "time_unix_nano": lambda i, s, r, m=None: i.time_unix_nano,
    "flags": lambda i, s, r, m=None: i.flags,
    "count": lambda i, s, r, m=None: None if type(i) is _NumberDP else i.count,
    "sum": _optional("sum"),
    "min": _optional("min"),
    "max": _optional("max"),
    "scale": lambda i, s, r, m=None: i.scale if type(i) is _ExpHistDP else None,
    "zero_count": lambda i, s, r, m=None: i.zero_count if type(i) is _ExpHistDP else None,
}

_METRIC: dict[str, Getter] = _metric_paths(lambda i, m: i)

_SCALARS: dict[str, dict[str, Getter]] = {
    "span": {**_COMMON, **_SPAN},
    "log": {**_COMMON, **_LOG},
    "datapoint": {**_COMMON, **_DATAPOINT},
    "metric": {**_COMMON, **_METRIC},
}

# Paths that are key/value maps: where the KeyValue list lives (0 item, 1 scope, 2 resource).
_MAPS = {"attributes": 0, "instrumentation_scope.attributes": 1, "resource.attributes": 2}
_MAP_CONTEXTS = {"span", "log", "datapoint"}  # a Metric has no attributes of its own


def _map_getter(owner: int, keys: tuple[str | int, ...]) -> Getter:
    if not keys:
        whole: tuple[Getter, ...] = (
            lambda i, s, r, m=None: map_to_python(i.attributes),
            lambda i, s, r, m=None: map_to_python(s.attributes),
            lambda i, s, r, m=None: map_to_python(r.attributes),
        )
        return whole[owner]
    if len(keys) == 1:
        key = keys[0]
        single: tuple[Getter, ...] = (
            lambda i, s, r, m=None: find(i.attributes, key),
            lambda i, s, r, m=None: find(s.attributes, key),
            lambda i, s, r, m=None: find(r.attributes, key),
        )
        return single[owner]
    nested: tuple[Getter, ...] = (
        lambda i, s, r, m=None: find_nested(i.attributes, keys),
        lambda i, s, r, m=None: find_nested(s.attributes, keys),
        lambda i, s, r, m=None: find_nested(r.attributes, keys),
    )
    return nested[owner]


def _known(context: str) -> list[str]:
    maps = [f'{p}["..."]' for p in _MAPS] if context in _MAP_CONTEXTS else []
    extra = {"span": ['trace_state["..."]'], "log": ["body", 'body["..."]']}.get(context, [])
    return maps + extra + sorted(_SCALARS[context])


def _exists(dotted: str, context: str) -> bool:
    if dotted in _MAPS:
        return context in _MAP_CONTEXTS
    return dotted in _SCALARS[context] or (dotted, context) in {("body", "log"), ("trace_state", "span")}


def _contexts(names: list[str]) -> str:
    return f"{names[0]} context" if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]} contexts"


def resolve_path(ref: PathRef, context: str, text: str) -> Getter:
    names = ref.names
    if len(names) > 1 and names[0] == context:  # the Collector's context-qualified form: span.name
        names = names[1:]
    if names[0] == "scope":  # newer Collector spelling of instrumentation_scope
        names = ("instrumentation_scope", *names[1:])
    dotted, keys = ".".join(names), ref.keys

    def fail(reason: str) -> OttlError:
        return OttlError(text, reason, ref.line, ref.column)

    if keys and isinstance(keys[0], int) and (dotted in _MAPS or dotted in ("body", "trace_state")):
        raise fail(f"'{dotted}' is a map and takes a string key, not [{keys[0]}], at {{where}}")
    if dotted in _MAPS and context in _MAP_CONTEXTS:
        return _map_getter(_MAPS[dotted], keys)
    if dotted == "body" and context == "log":
        if not keys:
            return lambda i, s, r, m=None: to_python(i.body)
        return lambda i, s, r, m=None: descend(i.body, keys)
    if dotted == "trace_state" and context == "span" and keys:
        if len(keys) > 1:
            raise fail("'trace_state' takes one key at {where}")
        member = keys[0]
        assert isinstance(member, str)
        return lambda i, s, r, m=None: trace_state_entry(i.trace_state, member)
    getter = _SCALARS[context].get(dotted)
    if getter is None:
        known = _known(context)
        close = difflib.get_close_matches(dotted, [k.split("[")[0] for k in known], n=1)
        elsewhere = [c for c in CONTEXTS if _exists(dotted, c)]
        if elsewhere:
            hint = f" (it is a path of the {_contexts(elsewhere)})"
        else:
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known paths: {', '.join(known)}"
        raise fail(f"unknown path '{ref.dotted}' for the {context} context at {{where}}{hint}")
    if keys:
        raise fail(f"path '{dotted}' cannot be indexed at {{where}}")
    return getter


# --- enums ----------------------------------------------------------------------------------------------

_METRIC_ENUMS = {
    "METRIC_DATA_TYPE_NONE": 0,
    **{f"METRIC_DATA_TYPE_{k.upper()}": v for k, v in _METRIC_TYPES.items()},
    **dict(metrics_pb2.AggregationTemporality.items()),
}
ENUMS: dict[str, dict[str, int]] = {
    "span": {**dict(trace_pb2.Span.SpanKind.items()), **dict(trace_pb2.Status.StatusCode.items())},
    "log": dict(logs_pb2.SeverityNumber.items()),
    "datapoint": {**_METRIC_ENUMS, "FLAG_NONE": 0, "FLAG_NO_RECORDED_VALUE": 1},
    "metric": _METRIC_ENUMS,
}


def resolve_enum(name: str, context: str, text: str, line: int, column: int) -> int:
    value = ENUMS[context].get(name)
    if value is None:
        close = difflib.get_close_matches(name, list(ENUMS[context]), n=1)
        elsewhere = [c for c in CONTEXTS if name in ENUMS[c]]
        if elsewhere:
            hint = f" (it is an enum of the {_contexts(elsewhere)})"
        else:
            hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise OttlError(text, f"unknown enum constant '{name}' for the {context} context at {{where}}{hint}",
                        line, column)  # fmt: skip
    return value
