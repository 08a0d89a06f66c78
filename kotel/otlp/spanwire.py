"""Spans of an ExportTraceServiceRequest read and regrouped on the wire, without building span objects.

Why: dedup needs only (trace_id, span_id, start time) of each span and, usually, the same record back
with each scope's spans sorted by start time. A full upb parse, a Python wrapper per span and a
re-encode cost most of the stage's time (loadtest/dedup_bench.py). Here upb parses a *view* of the
request whose spans are opaque ``bytes`` (its other fields survive as unknown fields), and the three
fields are read for all spans at once with numpy from the layout every OTLP encoder writes: trace_id
(field 1) and span_id (field 2) first, then fields 3-6, then start_time_unix_nano (field 7). Reordering
spans inside a scope keeps every length, so the rebuilt view is the same bytes in a new order.

Anything else (other field orders, a missing start time, multi-byte lengths before the start time, odd
id lengths, all-zero ids) makes `read_spans` answer None and the caller takes the decoded path, which
validates. Past the start time only the framing of each span's fields is checked (`read_many`), so a
structurally broken record takes the decoded path too, where it fails and is dead-lettered; the
contents of well-framed fields (attribute values, events) are left to the next stage's parse. A batch
of records costs one upb call per view and one numpy pass: per-record numpy overhead (~150 us) would
otherwise dominate small records.

Native twin. When the C extension `kotel.otlp._spanscan` is built (setup.py; it needs a C compiler),
`read_many` walks each record once in C and answers `ScannedSpans`, which rebuild in C too: the same
layout rules and refusals, about a sixth of the cost (loadtest/results/stages.md). `read_many_python` is the
reference the tests hold it to.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate, islice

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

from kotel.otlp.sizing import encode_varint

MATERIAL_SIZE = 34  # trace id, span id, start time (little endian), then the id lengths 16 and 8

_PACKAGE = "kotel.spanwire"
_T = descriptor_pb2.FieldDescriptorProto


def _view_classes() -> tuple[type[Message], type[Message]]:
    """Two views of a batch of requests (each one field 1 of a wrapper), field numbers those of OTLP.

    The read view stops at spans, kept as bytes. The check view goes one level further, to span
    messages with no declared field: upb then walks every field of every span as an unknown field
    (tags, varints, lengths within bounds) and fails on broken framing, at about 0.2 us per span.
    """
    proto = descriptor_pb2.FileDescriptorProto(name="kotel/spanwire.proto", package=_PACKAGE, syntax="proto3")
    for name, field, number, kind, child in (
        ("BatchView", "requests", 1, _T.TYPE_MESSAGE, "RequestView"),
        ("RequestView", "resource_spans", 1, _T.TYPE_MESSAGE, "ResourceView"),
        ("ResourceView", "scope_spans", 2, _T.TYPE_MESSAGE, "ScopeView"),
        ("ScopeView", "spans", 2, _T.TYPE_BYTES, None),
        ("BatchCheck", "requests", 1, _T.TYPE_MESSAGE, "RequestCheck"),
        ("RequestCheck", "resource_spans", 1, _T.TYPE_MESSAGE, "ResourceCheck"),
        ("ResourceCheck", "scope_spans", 2, _T.TYPE_MESSAGE, "ScopeCheck"),
        ("ScopeCheck", "spans", 2, _T.TYPE_MESSAGE, "SpanCheck"),
        ("SpanCheck", None, 0, 0, None),
    ):
        message = proto.message_type.add(name=name)
        if field is None:
            continue
        fd = message.field.add(name=field, number=number, label=_T.LABEL_REPEATED, type=kind)
        if child:
            fd.type_name = f".{_PACKAGE}.{child}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    get = message_factory.GetMessageClass
    return get(pool.FindMessageTypeByName(f"{_PACKAGE}.BatchView")), get(
        pool.FindMessageTypeByName(f"{_PACKAGE}.BatchCheck"))


try:
    from kotel.otlp import _spanscan
except ImportError:  # not built: read_many_python does the same, slower
    _spanscan = None
# For streams/stages/dedup_hash.py: span identities from material rows, in C (None when not built).
native_digests = None if _spanscan is None else _spanscan.digests

_BatchView, _BatchCheck = _view_classes()
_IDS = np.r_[2:18, 20:28]  # trace id and span id in the common head
_HEAD_AT, _HEAD_BYTES = np.array([0, 1, 18, 19]), np.array([0x0A, 0x10, 0x12, 0x08], np.uint8)
_STAMP = np.arange(1, 9)
_START_TAG = 0x39  # field 7, fixed64
_HEAD = 28  # 0a 10 <trace id> 12 08 <span id>
_PAD = bytes(_HEAD + 9)
_NUMPY_FROM = 128  # spans in a batch from which numpy beats a loop (~1 ms fixed cost on a busy host)
_MAX_FIELDS = 16  # fields 3-6 may repeat (unknown to us); past this many, take the decoded path


def is_sorted(times: Sequence[int]) -> bool:
    """Whether the times never decrease (items of a group already in time order)."""
    return all(map(operator.le, times, islice(times, 1, None)))


@dataclass(slots=True)
class WireSpans:
    """A request's spans by scope, in wire order: their bytes, identity material and start times."""

    view: Message
    groups: list[list[bytes]]
    material: bytes  # MATERIAL_SIZE bytes per span, in the same order
    starts: list[int]

    def __len__(self) -> int:
        return len(self.starts)

    def unordered_groups(self) -> set[int]:
        """The groups (scopes) whose spans are not in start-time order."""
        found, pos = set(), 0
        for group, spans in enumerate(self.groups):
            if not is_sorted(self.starts[pos:pos + len(spans)]):
                found.add(group)
            pos += len(spans)
        return found

    def rebuild(self, keep: Sequence[bool], sort_groups: set[int]) -> bytes | None:
        """The request with only the kept spans, groups in ``sort_groups`` sorted by start time (stable);
        scopes and resources left empty are removed. None when no span is left."""
        pos = group = 0
        ranked = self._ranked() if sort_groups else []
        resources = self.view.resource_spans  # type: ignore[attr-defined]
        empty_resources = []
        for r, resource in enumerate(resources):
            scopes = resource.scope_spans
            empty_scopes = []
            for s, scope in enumerate(scopes):
                spans = self.groups[group]
                count = len(spans)
                flags = keep[pos:pos + count]
                whole = all(flags)
                if group in sort_groups:
                    order = ranked[pos:pos + count]
                    if not whole:
                        order = [j for j in order if flags[j]]
                else:
                    order = None if whole else [j for j in range(count) if flags[j]]
                if order is not None:
                    scope.spans[:] = list(map(spans.__getitem__, order))
                    if not order:
                        empty_scopes.append(s)
                pos += count
                group += 1
            for s in reversed(empty_scopes):
                del scopes[s]
            if not len(scopes):
                empty_resources.append(r)
        for r in reversed(empty_resources):
            del resources[r]
        return self.view.SerializeToString() if len(resources) else None


    def _ranked(self) -> list[int]:
        """Per group, its spans' positions in the group stably sorted by start time: one numpy sort for
        the whole record instead of a Python sort per scope."""
        sizes = np.fromiter(map(len, self.groups), np.int64, len(self.groups))
        rows = np.frombuffer(self.material, np.uint8).reshape(-1, MATERIAL_SIZE)
        starts = rows[:, 24:32].copy().view("<u8").ravel()
        group_of = np.repeat(np.arange(len(sizes)), sizes)
        first = np.zeros(len(sizes), np.int64)
        np.cumsum(sizes[:-1], out=first[1:])
        return (np.lexsort((starts, group_of)) - first[group_of]).tolist()


@dataclass(slots=True)
class ScannedSpans:
    """`WireSpans` as the C reader answers it: the record itself, its material and its shape."""

    value: bytes
    material: bytes
    count: int
    scopes: int
    unordered: list[int]

    def __len__(self) -> int:
        return self.count

    def unordered_groups(self) -> set[int]:
        return set(self.unordered)

    def rebuild(self, keep: Sequence[bool], sort_groups: set[int]) -> bytes | None:
        """As `WireSpans.rebuild`; fields other than spans keep their places in the record."""
        sort = bytearray(self.scopes)
        for group in sort_groups:
            sort[group] = 1
        return _spanscan.rebuild(self.value, bytes(keep), bytes(sort))  # type: ignore[union-attr,no-any-return]


def read_spans(wire: bytes) -> WireSpans | ScannedSpans | None:
    """The spans of an OTLP/protobuf ExportTraceServiceRequest, or None if the decoded path must do it."""
    return read_many([wire])[0]


def read_many(values: Sequence[bytes]) -> Sequence[WireSpans | ScannedSpans | None]:
    """`read_spans` for a batch of records: in C when built, else `read_many_python`."""
    if _spanscan is None:
        return read_many_python(values)
    found: list[WireSpans | ScannedSpans | None] = []
    for value in values:
        scanned = _spanscan.scan(value)
        found.append(None if scanned is None else ScannedSpans(value, *scanned))
    return found


def _wrap(values: Sequence[bytes]) -> bytes:
    """The values as field 1 of one wrapper message: one upb call parses a whole batch. (Each value is
    copied once, by the join: a record is ~100 KiB at the stage's batch sizes.)"""
    parts = []
    for value in values:
        parts += (b"\x0a" + encode_varint(len(value)), value)
    return b"".join(parts)


def _framed(values: Sequence[bytes], wrapped: bytes | None = None) -> list[bool]:
    """Whether each value's framing is sound down to every field of every span (one call if all are)."""
    try:
        _BatchCheck.FromString(wrapped if wrapped is not None else _wrap(values))
        return [True] * len(values)
    except DecodeError:
        if len(values) == 1:
            return [False]
    return [_framed([value])[0] for value in values]


def read_many_python(values: Sequence[bytes]) -> list[WireSpans | None]:
    """`read_many` in Python: one framing check, one view parse, one numpy pass for the whole batch."""
    wrapped = _wrap(values)
    todo = [i for i, sound in enumerate(_framed(values, wrapped)) if sound]
    found: list[WireSpans | None] = [None] * len(values)
    if not todo:
        return found
    if len(todo) < len(values):
        wrapped = _wrap([values[i] for i in todo])
    views = _BatchView.FromString(wrapped).requests  # type: ignore[attr-defined]
    records = [[list(scope.spans) for resource in view.resource_spans for scope in resource.scope_spans]
               for view in views]
    flat = [span for groups in records for spans in groups for span in spans]
    material, starts, bad = (_material if len(flat) >= _NUMPY_FROM else _material_loop)(flat)
    bad_before = [0, *accumulate(bad)]  # bad spans before each position
    pos = 0
    for i, view, groups in zip(todo, views, records, strict=True):
        end = pos + sum(map(len, groups))
        if bad_before[end] == bad_before[pos]:
            chunk = material[pos * MATERIAL_SIZE:end * MATERIAL_SIZE]
            found[i] = WireSpans(view, groups, chunk, starts[pos:end])
        pos = end
    return found


def _material_loop(spans: list[bytes]) -> tuple[bytes, list[int], list[bool]]:
    """`_material` one span at a time: for a few spans, cheaper than numpy's fixed cost per call."""
    material, starts, bad = [], [], []
    for span in spans:
        found = _one_material(span)
        bad.append(found is None)
        material.append(found or bytes(MATERIAL_SIZE))
        starts.append(int.from_bytes(found[24:32], "little") if found else 0)
    return b"".join(material), starts, bad


def _one_material(span: bytes) -> bytes | None:
    n = len(span)
    if n < _HEAD + 9 or span[0] != 0x0A or span[1] != 0x10 or span[18] != 0x12 or span[19] != 0x08:
        return None
    at = _HEAD
    for _ in range(_MAX_FIELDS):
        tag = span[at]
        if tag == _START_TAG:
            break
        kind, length = tag & 7, span[at + 1]
        if tag < 0x18 or tag > _START_TAG or kind in (3, 4, 6, 7) or (kind in (0, 2) and length >= 0x80):
            return None
        at += 2 + length if kind == 2 else 9 if kind == 1 else 5 if kind == 5 else 2
        if at + 9 > n:
            return None
    if span[at] != _START_TAG or not any(span[2:18]) or not any(span[20:28]):
        return None
    return span[2:18] + span[20:28] + span[at + 1:at + 9] + b"\x10\x08"


def _material(spans: list[bytes]) -> tuple[bytes, list[int], list[bool]]:
    """Identity material and start times of every span at once (numpy), and which spans are off the
    common layout (their material is meaningless)."""
    count = len(spans)
    buf = np.frombuffer(b"".join([*spans, _PAD]), np.uint8)  # padded: no read past its end
    lens = np.fromiter(map(len, spans), np.int64, count)
    pos = np.zeros(count, np.int64)
    np.cumsum(lens[:-1], out=pos[1:])
    end = pos + lens
    bad = (lens < _HEAD + 9) | (buf[pos[:, None] + _HEAD_AT] != _HEAD_BYTES).any(axis=1)
    at = pos + _HEAD
    limit = len(buf) - 9
    for _ in range(_MAX_FIELDS):
        tags = buf[at]
        todo = np.flatnonzero((tags != _START_TAG) & ~bad)
        if not len(todo):
            break
        tag, here = tags[todo], at[todo]
        kind = tag & 7
        length = buf[here + 1].astype(np.int64)
        # Single-byte tags of fields 3-6 only: a later field first means another layout (or no start).
        bad[todo] |= ((tag < 0x18) | (tag >= _START_TAG) | (kind == 3) | (kind == 4) | (kind == 6)
                      | (kind == 7) | (((kind == 0) | (kind == 2)) & (length >= 0x80)))
        step = np.where(kind == 2, 2 + length, np.where(kind == 1, 9, np.where(kind == 5, 5, 2)))
        at[todo] = np.minimum(here + step, limit)
        bad |= at + 9 > end
    bad |= buf[at] != _START_TAG  # still no start time after _MAX_FIELDS fields
    material = np.empty((count, MATERIAL_SIZE), np.uint8)
    material[:, :24] = buf[pos[:, None] + _IDS]
    material[:, 24:32] = buf[at[:, None] + _STAMP]
    material[:, 32], material[:, 33] = 16, 8
    words = material[:, :32].copy().view("<u8")  # trace id (2 words), span id, start time
    bad |= ((words[:, 0] | words[:, 1]) == 0) | (words[:, 2] == 0)  # all-zero ids: decoded path
    return material.tobytes(), words[:, 3].tolist(), bad.tolist()
