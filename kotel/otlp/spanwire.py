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
validates. Span contents past the start time are not parsed here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

MATERIAL_SIZE = 34  # trace id, span id, start time (little endian), then the id lengths 16 and 8

_PACKAGE = "kotel.spanwire"
_T = descriptor_pb2.FieldDescriptorProto


def _view_classes() -> type[Message]:
    """Request -> resources -> scopes -> spans as bytes; field numbers are those of the OTLP messages."""
    proto = descriptor_pb2.FileDescriptorProto(name="kotel/spanwire.proto", package=_PACKAGE, syntax="proto3")
    for name, field, number, kind, child in (
        ("RequestView", "resource_spans", 1, _T.TYPE_MESSAGE, "ResourceView"),
        ("ResourceView", "scope_spans", 2, _T.TYPE_MESSAGE, "ScopeView"),
        ("ScopeView", "spans", 2, _T.TYPE_BYTES, None),
    ):
        message = proto.message_type.add(name=name)
        fd = message.field.add(name=field, number=number, label=_T.LABEL_REPEATED, type=kind)
        if child:
            fd.type_name = f".{_PACKAGE}.{child}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.RequestView"))


_RequestView = _view_classes()
_TRACE = np.arange(2, 18)
_SPAN = np.arange(20, 28)
_STAMP = np.arange(1, 9)
_START_TAG = 0x39  # field 7, fixed64
_HEAD = 28  # 0a 10 <trace id> 12 08 <span id>
_MAX_FIELDS = 16  # fields 3-6 may repeat (unknown to us); past this many, take the decoded path


@dataclass(slots=True)
class WireSpans:
    """A request's spans by scope, in wire order: their bytes, identity material and start times."""

    view: Message
    groups: list[list[bytes]]
    material: bytes  # MATERIAL_SIZE bytes per span, in the same order
    starts: list[int]

    def __len__(self) -> int:
        return len(self.starts)

    def rebuild(self, keep: Sequence[bool], sort_groups: set[int]) -> bytes | None:
        """The request with only the kept spans, groups in ``sort_groups`` sorted by start time (stable);
        scopes and resources left empty are removed. None when no span is left."""
        pos = group = 0
        starts = self.starts
        resources = self.view.resource_spans  # type: ignore[attr-defined]
        empty_resources = []
        for r, resource in enumerate(resources):
            scopes = resource.scope_spans
            empty_scopes = []
            for s, scope in enumerate(scopes):
                spans = self.groups[group]
                count = len(spans)
                flags = keep[pos:pos + count]
                order = [j for j in range(count) if flags[j]] if not all(flags) else list(range(count))
                if group in sort_groups:
                    order.sort(key=starts[pos:pos + count].__getitem__)
                if len(order) != count or group in sort_groups:
                    scope.spans[:] = [spans[j] for j in order]
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


def read_spans(wire: bytes) -> WireSpans | None:
    """The spans of an OTLP/protobuf ExportTraceServiceRequest, or None if the decoded path must do it."""
    try:
        view = _RequestView.FromString(wire)
    except DecodeError:
        return None
    groups = [list(scope.spans) for resource in view.resource_spans  # type: ignore[attr-defined]
              for scope in resource.scope_spans]
    flat = [span for spans in groups for span in spans]
    if not flat:
        return WireSpans(view, groups, b"", [])
    found = _material(flat)
    if found is None:
        return None
    material, starts = found
    return WireSpans(view, groups, material.tobytes(), starts.tolist())


def _material(spans: list[bytes]) -> tuple[np.ndarray, np.ndarray] | None:
    """Identity material and start times of every span at once (numpy), or None off the common layout."""
    buf = np.frombuffer(b"".join(spans), np.uint8)
    lens = np.fromiter(map(len, spans), np.int64, len(spans))
    pos = np.zeros(len(spans), np.int64)
    np.cumsum(lens[:-1], out=pos[1:])
    end = pos + lens
    if (lens < _HEAD + 9).any():
        return None
    if not ((buf[pos] == 0x0A) & (buf[pos + 1] == 0x10) & (buf[pos + 18] == 0x12)
            & (buf[pos + 19] == 0x08)).all():
        return None
    at = pos + _HEAD
    last = len(buf) - 1
    for _ in range(_MAX_FIELDS):
        tags = buf[np.minimum(at, last)]
        todo = np.flatnonzero(tags != _START_TAG)
        if not len(todo):
            break
        tag, here = tags[todo], at[todo]
        kind = tag & 7
        length = buf[np.minimum(here + 1, last)].astype(np.int64)
        # Single-byte tags of fields 3-6 only: a later field first means another layout (or no start).
        if ((tag < 0x18) | (tag >= _START_TAG) | (kind == 3) | (kind == 4) | (kind == 6) | (kind == 7)
                | (((kind == 0) | (kind == 2)) & (length >= 0x80))).any():
            return None
        at[todo] = here + np.where(kind == 2, 2 + length, np.where(kind == 1, 9, np.where(kind == 5, 5, 2)))
        if (at + 9 > end).any():
            return None
    else:
        return None
    material = np.empty((len(spans), MATERIAL_SIZE), np.uint8)
    material[:, :16] = buf[pos[:, None] + _TRACE]
    material[:, 16:24] = buf[pos[:, None] + _SPAN]
    material[:, 24:32] = buf[at[:, None] + _STAMP]
    material[:, 32], material[:, 33] = 16, 8
    if not material[:, :16].any(axis=1).all() or not material[:, 16:24].any(axis=1).all():
        return None  # an all-zero id: the decoded path validates and dead-letters
    starts = np.ascontiguousarray(material[:, 24:32]).view("<u8").ravel()
    return material, starts
