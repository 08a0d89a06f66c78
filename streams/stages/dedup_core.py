"""Dedup over OTLP requests, without Faust: item identities, the keep decision, and the rebuild.

An item is a span, a log record or a metric data point. Its identity is a 16-byte digest of a canonical
serialization (attribute order never matters), so it is stable across processes and releases and is what
the stage keeps in RocksDB: BLAKE2b for logs and points, a vectorised hash for spans (`dedup_hash`).
The binding works on batches: `identify` one request, look its identities up in bulk, then `apply_keep`
removes the duplicates and sorts what is left.

The stage's hot path is `identify_records`, a batch of records at once: spans are read on the wire
(`kotel.otlp.spanwire`) and a record is rebuilt only when a duplicate or an out-of-order scope asks
for it; anything off the common layout, and every log and metric record, goes through the decoded
messages.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from google.protobuf.message import Message

from kotel.otlp import OtlpDecodeError, Signal, count_items, decode_protobuf
from kotel.otlp.spanwire import ScannedSpans, WireSpans, is_sorted, read_many
from streams.stages.dedup_hash import span_digests

IDENTITY_SIZE = 16

_blake = hashlib.blake2b
_span_tail = struct.Struct("<QBB").pack  # start time, then the id lengths: unambiguous for odd ids
_log_fixed = struct.Struct("<QQi").pack  # time, observed time, severity number
_point_times = struct.Struct("<QQ").pack  # start time, time
_frame_len = struct.Struct("<I").pack


def _digest(data: bytes) -> bytes:
    return _blake(data, digest_size=IDENTITY_SIZE).digest()


def _framed(parts: Iterator[bytes] | list[bytes]) -> bytes:
    return b"".join(_frame_len(len(p)) + p for p in parts)


def _canon_value(value: Any) -> bytes:
    """An AnyValue's bytes with every nested key-value list in one canonical order."""
    kind = value.WhichOneof("value")
    if kind == "kvlist_value":
        return b"K" + _canon_attributes(value.kvlist_value.values)
    if kind == "array_value":
        return b"A" + _framed([_canon_value(v) for v in value.array_value.values])
    return value.SerializeToString(deterministic=True)


def _canon_attributes(attributes: Any) -> bytes:
    """Attributes as a sorted multiset of (key, canonical value): reordering them keeps the identity."""
    if not attributes:
        return b""
    return _framed(sorted(kv.key.encode() + b"\0" + _canon_value(kv.value) for kv in attributes))


def _resource_digest(resource: Any) -> bytes:
    return _digest(_canon_attributes(resource.attributes))


def _scope_digest(scope: Any) -> bytes:
    attributes = _canon_attributes(scope.attributes)
    return _digest(_framed([scope.name.encode(), scope.version.encode(), attributes]))


@dataclass(slots=True)
class Items:
    """Identities of a request's items in traversal order, and what else the stage needs to know."""

    ids: list[bytes]
    unordered: set[int] = field(default_factory=set)  # item groups (scopes; metrics) not in time order
    suspect: bool = False  # a span whose ids break the OTLP rules: run the full validation

    @property
    def ordered(self) -> bool:
        return not self.unordered


_span_fields = attrgetter("trace_id", "span_id", "start_time_unix_nano")
_starts = attrgetter("start_time_unix_nano")
_point_time = attrgetter("time_unix_nano")
_span_material = struct.Struct("<16s8sQBB").pack  # == id + id + _span_tail(...) when the ids are valid
_ZERO_TRACE, _ZERO_SPAN = bytes(16), bytes(8)


def _log_time(record: Any) -> int:
    return record.time_unix_nano or record.observed_time_unix_nano  # type: ignore[no-any-return]


def _all_len(values: Sequence[bytes], size: int) -> bool:
    return set(map(len, values)) <= {size}


def _span_ids_suspect(tids: tuple[bytes, ...], sids: tuple[bytes, ...]) -> bool:
    """Whether a trace or span id is unusable (wrong length, all zeros); C-level passes only.

    Other span rules (parent and link ids) do not matter to dedup and are left to the agent's validation.
    """
    return not (_all_len(tids, 16) and _all_len(sids, 8)) or _ZERO_TRACE in tids or _ZERO_SPAN in sids


def _identify_spans(request: Any, items: Items) -> None:
    extend = items.ids.extend
    group = 0
    for rs in request.resource_spans:
        for ss in rs.scope_spans:
            fields = list(map(_span_fields, ss.spans))
            if not fields:
                group += 1
                continue
            tids, sids, starts = zip(*fields, strict=True)
            if _span_ids_suspect(tids, sids):
                # Odd lengths: the exact canonical form (fixed-width packing would pad or cut them).
                items.suspect = True
                extend([_digest(t + s + _span_tail(st, len(t), len(s))) for t, s, st in fields])
            else:
                material = _span_material
                extend(span_digests(b"".join([material(t, s, st, 16, 8) for t, s, st in fields])))
            if not is_sorted(starts):
                items.unordered.add(group)
            group += 1


def _identify_logs(request: Any, items: Items) -> None:
    add, group = items.ids.append, 0
    for rl in request.resource_logs:
        res = _resource_digest(rl.resource)
        for sl in rl.scope_logs:
            prefix = res + _scope_digest(sl.scope)
            records = sl.log_records
            for rec in records:
                add(_digest(prefix + _framed([
                    _log_fixed(rec.time_unix_nano, rec.observed_time_unix_nano, rec.severity_number),
                    rec.severity_text.encode(), _canon_value(rec.body), _canon_attributes(rec.attributes),
                    rec.trace_id, rec.span_id,
                ])))
            if not is_sorted(list(map(_log_time, records))):
                items.unordered.add(group)
            group += 1


def _identify_metrics(request: Any, items: Items) -> None:
    add, group = items.ids.append, 0
    for rm in request.resource_metrics:
        res = _resource_digest(rm.resource)
        for sm in rm.scope_metrics:
            prefix = res + _scope_digest(sm.scope)
            for metric in sm.metrics:
                kind = metric.WhichOneof("data")
                if kind is None:
                    continue
                named = prefix + _frame_len(len(metric.name)) + metric.name.encode()
                points = getattr(metric, kind).data_points
                for point in points:
                    add(_digest(named + _point_times(point.start_time_unix_nano, point.time_unix_nano)
                                + _canon_attributes(point.attributes)))
                if not is_sorted(list(map(_point_time, points))):
                    items.unordered.add(group)
                group += 1


def identify(signal: Signal, request: Message) -> Items:
    """Every item's identity: spans by (trace_id, span_id, start time), logs and points by content.

    Spans are the hot path, so their fields are read with C-level passes per scope; only the digest is
    computed per item.
    """
    items = Items([])
    if signal is Signal.TRACES:
        _identify_spans(request, items)
    elif signal is Signal.LOGS:
        _identify_logs(request, items)
    else:
        _identify_metrics(request, items)
    return items


def _filter_sort(container: Any, keep: Sequence[bool], start: int, sort: bool,
                 time_of: Callable[[Any], int]) -> int:
    """Drop the items not kept from one repeated field, sort the rest by time if asked; items left."""
    count = len(container)
    flags = keep[start:start + count]
    if not all(flags):
        for j in range(count - 1, -1, -1):
            if not flags[j]:
                del container[j]
    if sort and len(container) > 1:
        container.sort(key=time_of)
    return len(container)


def _prune(container: Any, empty: list[int]) -> None:
    for j in reversed(empty):
        del container[j]


def apply_keep(signal: Signal, request: Message, keep: Sequence[bool],
               items: Items | None = None) -> Message | None:
    """Keep exactly the flagged items (in `identify` order), time-sorted per scope; prunes what empties.

    Works in place on ``request`` and returns it, or None when no item is left. ``items`` (from
    `identify`) says which groups need sorting; without it every group is sorted.
    """
    total = count_items(request)
    if total != len(keep):
        raise ValueError(f"keep has {len(keep)} flags but the request has {total} items")
    unordered = items.unordered if items is not None else None
    time_of = _starts if signal is Signal.TRACES else _log_time
    pos = group = 0
    resources = getattr(request, signal.resource_field)
    empty_resources = []
    for r, res in enumerate(resources):
        scopes = getattr(res, signal.scope_field)
        empty_scopes = []
        for s, scope in enumerate(scopes):
            if signal is Signal.METRICS:
                metrics = scope.metrics
                empty_metrics = []
                for m, metric in enumerate(metrics):
                    kind = metric.WhichOneof("data")
                    if kind is None:
                        empty_metrics.append(m)
                        continue
                    points = getattr(metric, kind).data_points
                    count = len(points)
                    sort = unordered is None or group in unordered
                    if not _filter_sort(points, keep, pos, sort, _point_time):
                        empty_metrics.append(m)
                    pos += count
                    group += 1
                _prune(metrics, empty_metrics)
                left = len(metrics)
            else:
                found = getattr(scope, signal.item_field)
                count = len(found)
                left = _filter_sort(found, keep, pos, unordered is None or group in unordered, time_of)
                pos += count
                group += 1
            if not left:
                empty_scopes.append(s)
        _prune(scopes, empty_scopes)
        if not len(scopes):
            empty_resources.append(r)
    _prune(resources, empty_resources)
    return request if len(resources) else None


def decide(ids: Sequence[bytes], already_seen: Sequence[bool]) -> tuple[list[bool], list[bytes]]:
    """Keep flags and the new identities; an identity twice in ``ids`` is kept only the first time."""
    if not any(already_seen) and len(set(ids)) == len(ids):
        return [True] * len(ids), list(ids)  # the common case, without a Python-level loop
    keep: list[bool] = []
    fresh: list[bytes] = []
    batch: set[bytes] = set()
    for identity, seen in zip(ids, already_seen, strict=True):
        if seen or identity in batch:
            keep.append(False)
        else:
            batch.add(identity)
            fresh.append(identity)
            keep.append(True)
    return keep, fresh


def dedup_request(
    signal: Signal,
    request: Message,
    seen: Callable[[bytes], bool],
    remember: Callable[[bytes], None],
) -> tuple[Message | None, int]:
    """The request with only its new items (or None) and the number of duplicates dropped.

    ``seen`` answers for earlier requests; duplicates inside ``request`` itself are caught here.
    ``remember`` is called once per new identity, in item order.
    """
    items = identify(signal, request)
    keep, fresh = decide(items.ids, [seen(i) for i in items.ids])
    for identity in fresh:
        remember(identity)
    duplicates = len(keep) - len(fresh)
    if not duplicates and items.ordered:
        return (request if keep else None), 0
    return apply_keep(signal, request, keep, items), duplicates


@dataclass(slots=True)
class Record:
    """One input record, identified: its items and how to write it back with only some of them.

    ``request`` is the decoded message when the record took the decoded path (None on the wire path,
    where nothing past the span identities was parsed, so there is nothing to validate either).
    """

    value: bytes
    items: Items
    request: Message | None
    wire: WireSpans | ScannedSpans | None = None

    def output(self, signal: Signal, keep: Sequence[bool]) -> bytes | None:
        """The bytes holding exactly the kept items, time-sorted per group; the input itself when every
        item is kept and already in order (the common case: no re-encoding); None when none is kept."""
        if len(keep) != len(self.items.ids):
            raise ValueError(f"keep has {len(keep)} flags but the record has {len(self.items.ids)} items")
        if not any(keep):
            return None
        if self.items.ordered and all(keep):
            return self.value
        if self.wire is not None:
            return self.wire.rebuild(keep, self.items.unordered)
        assert self.request is not None
        kept = apply_keep(signal, self.request, keep, self.items)
        return kept.SerializeToString() if kept is not None else None


def _wire_items(spans: WireSpans | ScannedSpans, ids: list[bytes]) -> Items:
    return Items(ids, spans.unordered_groups())


def identify_records(signal: Signal, values: Sequence[bytes]) -> list[Record | OtlpDecodeError]:
    """`identify_record` for a batch: spans of every record on the wire path are read and hashed together;
    a record that is not the signal's export request gets its OtlpDecodeError in its place."""
    found: list[Record | OtlpDecodeError | None] = [None] * len(values)
    if signal is Signal.TRACES:
        wire = [(i, spans) for i, spans in enumerate(read_many(values)) if spans is not None]
        ids = span_digests(b"".join([spans.material for _, spans in wire]))
        pos = 0
        for i, spans in wire:
            found[i] = Record(values[i], _wire_items(spans, ids[pos:pos + len(spans)]), None, spans)
            pos += len(spans)
    for i, value in enumerate(values):
        if found[i] is None:
            try:
                request = decode_protobuf(signal, value)
            except OtlpDecodeError as exc:
                found[i] = exc
                continue
            found[i] = Record(value, identify(signal, request), request)
    return found  # type: ignore[return-value]


def identify_record(signal: Signal, value: bytes) -> Record:
    """Identify a record's items, on the wire for spans in the usual layout, else decoded.

    OtlpDecodeError when the bytes are not the signal's export request.
    """
    record = identify_records(signal, [value])[0]
    if isinstance(record, OtlpDecodeError):
        raise record
    return record
