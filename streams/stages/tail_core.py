"""Tail sampling over OTLP bytes, without Faust: regrouping by trace, fragments, state records.

Regroup. The input is keyed by service instance, so a record holds spans of many traces. `regroup` cuts
it into one resource entry per trace (resource, scope and schema URLs kept) and joins the entries bound
for one partition of the repartition topic into one valid ExportTraceServiceRequest: one record per
destination partition, not one per span. Because every entry of such a bundle holds exactly one trace,
the buffering side (`fragments`) only reads one trace id per entry and slices the bundle's wire form;
it never re-encodes a span. A fragment is what one bundle adds to one trace.

State records. The changelog is the stage's event log: `B` (a bundle was ingested: input offset, time,
tenant, bytes), `D` (traces were decided: verdicts with the span ids emitted), `P`
(outputs found past the changelog after a takeover) and `W` (the decision clock moved on, so a new
owner starts from it; see streams.stages.tail_clock). Replaying them through the same code rebuilds the
state exactly; see streams.stages.tail_state. A worker that does not know `W` skips it harmlessly.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Sequence
from operator import attrgetter
from typing import Any, NamedTuple

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans

from kotel.otlp import OtlpDecodeError, frame, join
from kotel.otlp.sizing import encode_varint, read_varint

try:  # the C twin of regroup and summarize (setup.py); without a compiler the Python code below runs
    from streams.stages import _tailwire
except ImportError:  # pragma: no cover - exercised only where no compiler was found
    _tailwire = None

TRACE_ID_SIZE, SPAN_ID_SIZE = 16, 8
_ZERO_TRACE = bytes(TRACE_ID_SIZE)
SCHEMA = b"otlp-proto-v1"  # the agent's kotel.schema value: records of this stage are plain OTLP too

_trace_id = attrgetter("trace_id")
_span_id = attrgetter("span_id")
_parent = attrgetter("parent_span_id")


def trace_partition(trace_id: bytes, partitions: int) -> int:
    """The repartition-topic partition of a trace: CRC-32, stable across processes (hash() is salted)."""
    return zlib.crc32(trace_id) % partitions


def _field(tag: bytes, payload: bytes) -> bytes:
    return tag + encode_varint(len(payload)) + payload


_RES, _SCOPE_SPANS, _URL = b"\x0a", b"\x12", b"\x1a"  # ResourceSpans 1, 2, 3 (ScopeSpans: same numbers)
_INDEX = struct.Struct(">16sIBI")  # trace id, spans, root, framed length


class _Bundle:
    """The framed one-trace entries bound for one partition, and their index (see `fragments`)."""

    __slots__ = ("framed", "index")

    def __init__(self) -> None:
        self.framed: list[bytes] = []
        self.index: list[bytes] = []

    def add(self, tid: bytes, framed: bytes, spans: int, root: bool) -> None:
        self.framed.append(framed)
        self.index.append(_INDEX.pack(tid, spans, root, len(framed)))


def _per_trace(rs: ResourceSpans) -> dict[bytes, list[Any]]:
    """Trace id -> [scope parts (framed ScopeSpans bytes), spans, root] of one resource entry.

    The wire form is assembled here from the serialized resource, scopes and spans: building a message
    per trace (resource copied each time) cost several times more.
    """
    groups: dict[bytes, list[Any]] = {}
    for ss in rs.scope_spans:
        spans = ss.spans
        tids = list(map(_trace_id, spans))
        if not tids:
            continue
        first = tids[0]
        if tids.count(first) == len(tids):
            slot = groups.setdefault(first, [[], 0, False])
            slot[0].append(_field(_SCOPE_SPANS, ss.SerializeToString()))
            slot[1] += len(tids)
            slot[2] = slot[2] or b"" in map(_parent, spans)
            continue
        by_trace: dict[bytes, list[int]] = {}
        for i, tid in enumerate(tids):
            by_trace.setdefault(tid, []).append(i)
        head = _field(b"\x0a", ss.scope.SerializeToString()) if ss.HasField("scope") else b""
        tail = _field(_URL, ss.schema_url.encode()) if ss.schema_url else b""
        for tid, indexes in by_trace.items():
            chosen = [spans[i] for i in indexes]
            body = head + ScopeSpans(spans=chosen).SerializeToString() + tail  # one C call for the spans
            slot = groups.setdefault(tid, [[], 0, False])
            slot[0].append(_field(_SCOPE_SPANS, body))
            slot[1] += len(chosen)
            slot[2] = slot[2] or b"" in map(_parent, chosen)
    return groups


def _check(trace_id: bytes) -> bytes:
    if len(trace_id) != TRACE_ID_SIZE or trace_id == _ZERO_TRACE:
        raise OtlpDecodeError(f"invalid OTLP span: trace id {trace_id.hex() or 'empty'} is not 16 bytes "
                              "with one of them non-zero")
    return trace_id


Bundles = dict[int, tuple[bytes, bytes]]
INDEX_HEADER = "kotel.tail.index"


def regroup(request: ExportTraceServiceRequest, partitions: int, value: bytes | None = None
            ) -> tuple[Bundles, int]:
    """Destination partition -> (bundle, index): one request holding every span of ``request`` bound
    there, each resource entry holding the spans of one trace; and the number of spans.

    The index (trace id, spans, root, length per entry) lets the buffering side slice the bundle
    without parsing it. Raises OtlpDecodeError for a span without a valid trace id (it has no partition).
    With ``value`` (the request's bytes) the C splitter does the work when built: the same answer, bytes
    copied instead of re-encoded (it answers None off the usual layout, and the code below runs).
    """
    if value is not None and _tailwire is not None:
        found = _tailwire.split(value, partitions)
        if found is not None:
            return found  # type: ignore[no-any-return]
    return regroup_python(request, partitions)


def regroup_python(request: ExportTraceServiceRequest, partitions: int) -> tuple[Bundles, int]:
    """`regroup` in Python, the reference the C splitter is held to."""
    out: dict[int, _Bundle] = {}
    total = 0
    for rs in request.resource_spans:
        groups = _per_trace(rs)
        if not groups:
            continue
        if len(groups) == 1:  # one trace: the entry as it is
            ((tid, (_, spans, root)),) = groups.items()
            framed = frame(rs.SerializeToString())
            out.setdefault(trace_partition(_check(tid), partitions), _Bundle()).add(tid, framed, spans, root)
            total += spans
            continue
        head = _field(_RES, rs.resource.SerializeToString()) if rs.HasField("resource") else b""
        tail = _field(_URL, rs.schema_url.encode()) if rs.schema_url else b""
        for tid, (parts, spans, root) in groups.items():
            framed = _field(_RES, b"".join([head, *parts, tail]))
            out.setdefault(trace_partition(_check(tid), partitions), _Bundle()).add(tid, framed, spans, root)
            total += spans
    return {p: (join(b.framed), b"".join(b.index)) for p, b in out.items()}, total


class Fragment(NamedTuple):
    """What one bundle adds to one trace: its framed entries, span count and whether a root is there."""

    trace_id: bytes
    framed: bytes
    spans: int
    root: bool




def fragments(bundle: bytes, index: bytes | None = None) -> list[Fragment]:
    """The fragments of a bundle written by `regroup`, in first-seen order.

    With the bundle's ``index`` nothing is parsed; without it (or with one that does not fit) the
    bundle is. Raises OtlpDecodeError when the bundle is not a request of one-trace entries.
    """
    if index and len(index) % _INDEX.size == 0:
        found: dict[bytes, tuple[list[bytes], list[int]]] = {}
        pos = 0
        for tid, spans, root, length in _INDEX.iter_unpack(index):
            parts, counts = found.setdefault(tid, ([], [0, 0]))
            parts.append(bundle[pos:pos + length])
            counts[0] += spans
            counts[1] |= root
            pos += length
        if pos == len(bundle) and all(tid != _ZERO_TRACE for tid in found):
            return [Fragment(tid, join(parts), n, bool(root)) for tid, (parts, (n, root)) in found.items()]
    return _parse_fragments(bundle)


def _parse_fragments(bundle: bytes) -> list[Fragment]:
    try:
        request = ExportTraceServiceRequest.FromString(bundle)
    except Exception:  # upb raises DecodeError; anything undecodable is the same problem here
        raise OtlpDecodeError("repartition record is not an OTLP ExportTraceServiceRequest") from None
    view = memoryview(bundle)
    pos = 0
    found: dict[bytes, tuple[list[bytes], list[int]]] = {}  # framed entries; [spans, root]
    for rs in request.resource_spans:
        if view[pos] != 0x0A:
            raise OtlpDecodeError("repartition record holds fields other than resource entries")
        length, start = read_varint(view, pos + 1)
        entry, pos = bytes(view[pos:start + length]), start + length
        spans = [s for ss in rs.scope_spans for s in ss.spans]
        if not spans:
            continue
        tid = spans[0].trace_id
        if len(tid) != TRACE_ID_SIZE or any(t != tid for t in map(_trace_id, spans)):
            raise OtlpDecodeError("repartition record entry does not hold exactly one valid trace")
        parts, counts = found.setdefault(tid, ([], [0, 0]))
        parts.append(entry)
        counts[0] += len(spans)
        counts[1] |= b"" in map(_parent, spans)
    return [Fragment(tid, join(parts), n, bool(root)) for tid, (parts, (n, root)) in found.items()]


class TraceSummary(NamedTuple):
    """What the common policies need of a trace, read off its wire form in one pass (`summarize`)."""

    spans: int
    first_start: int  # earliest non-zero start_time_unix_nano, 0 when none
    last_end: int  # latest end_time_unix_nano
    status_codes: int  # bit c set when some span's status code is c (0-63)
    span_ids: bytes  # 8 bytes per span, in order


def summarize(framed: bytes) -> TraceSummary | None:
    """A trace's summary read in C; None when the extension is not built or the bytes are off its
    layout (the caller then decodes them)."""
    if _tailwire is None:
        return None
    found = _tailwire.summary(framed)
    return TraceSummary(*found) if found is not None else None


def summary_of(resources: Iterable[ResourceSpans]) -> TraceSummary:
    """The same summary from decoded resources: the reference `summarize` is held to."""
    first = last = codes = 0
    ids = []
    for rs in resources:
        for ss in rs.scope_spans:
            for span in ss.spans:
                start, end, code = span.start_time_unix_nano, span.end_time_unix_nano, span.status.code
                first = start if start and (not first or start < first) else first
                last = max(last, end)
                codes |= 1 << code if 0 <= code < 64 else 0
                ids.append(span.span_id)
    return TraceSummary(len(ids), first, last, codes, b"".join(ids))


def decode_trace(framed: bytes) -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest.FromString(framed)


def span_ids(request: ExportTraceServiceRequest) -> list[bytes]:
    return [sid for rs in request.resource_spans for ss in rs.scope_spans for sid in map(_span_id, ss.spans)]


def drop_spans(request: ExportTraceServiceRequest, emitted: set[bytes]) -> tuple[bytes, list[bytes]]:
    """The request without the spans in ``emitted`` and without repeats; (bytes, span ids kept)."""
    seen = set(emitted)
    resources = request.resource_spans
    for r in range(len(resources) - 1, -1, -1):
        scopes = resources[r].scope_spans
        for s in range(len(scopes)):
            spans = scopes[s].spans
            drop = []
            for i, sid in enumerate(map(_span_id, spans)):
                if sid in seen:
                    drop.append(i)
                seen.add(sid)
            for i in reversed(drop):
                del spans[i]
        for s in range(len(scopes) - 1, -1, -1):
            if not len(scopes[s].spans):
                del scopes[s]
        if not len(scopes):
            del resources[r]
    return request.SerializeToString(), span_ids(request)


# --- state records ---------------------------------------------------------------------------------

_COVER = struct.Struct(">iq")  # output partition, offset: every output up to it is in the log
_BUNDLE = struct.Struct(">qqBI")  # input offset, time ms, tenant length, index length
_DECIDED = struct.Struct(">qI")  # time ms, count
_VERDICT = struct.Struct(">16sBBII")  # trace id, sampled, policy length, fragments decided, span ids
_CLOCK = struct.Struct(">q")  # decision clock ms
Cover = tuple[int, int]
NO_COVER: Cover = (-1, -1)


class Verdict(NamedTuple):
    """A decided trace; ``emitted`` are the span ids written to the output for it (sampled only).

    ``fragments``: how many of its buffered fragments the decision saw. A fragment the log holds
    before the verdict but the decision did not see arrived after it, and is replayed as late.
    """

    trace_id: bytes
    sampled: bool
    policy: str
    emitted: tuple[bytes, ...]
    fragments: int = 0


class BundleRecord(NamedTuple):
    offset: int
    stamp_ms: int
    tenant: str
    bundle: bytes
    index: bytes


class DecisionRecord(NamedTuple):
    stamp_ms: int
    verdicts: list[Verdict]
    primed: bool  # True: outputs found after a takeover (P), False: the stage's own decisions (D)


class ClockRecord(NamedTuple):
    clock_ms: int


def encode_bundle(cover: Cover, offset: int, stamp_ms: int, tenant: str, bundle: bytes,
                  index: bytes = b"") -> bytes:
    raw = tenant.encode()[:255]
    return b"".join([b"B", _COVER.pack(*cover), _BUNDLE.pack(offset, stamp_ms, len(raw), len(index)), raw,
                     index, bundle])


def encode_decisions(cover: Cover, stamp_ms: int, verdicts: Sequence[Verdict], primed: bool = False) -> bytes:
    parts = [b"P" if primed else b"D", _COVER.pack(*cover), _DECIDED.pack(stamp_ms, len(verdicts))]
    for v in verdicts:
        policy = v.policy.encode()[:255]
        parts += [_VERDICT.pack(v.trace_id, v.sampled, len(policy), v.fragments, len(v.emitted)), policy,
                  *v.emitted]
    return b"".join(parts)


def encode_clock(cover: Cover, clock_ms: int) -> bytes:
    return b"".join([b"W", _COVER.pack(*cover), _CLOCK.pack(clock_ms)])


Record = BundleRecord | DecisionRecord | ClockRecord


def decode_record(value: bytes | None) -> tuple[Cover, Record] | None:
    """A changelog record, or None when it is not one of ours (it is then skipped)."""
    if not value or len(value) < 1 + _COVER.size:
        return None
    kind, pos = value[:1], 1 + _COVER.size
    cover: Cover = _COVER.unpack_from(value, 1)
    try:
        if kind == b"B":
            offset, stamp, size, isize = _BUNDLE.unpack_from(value, pos)
            pos += _BUNDLE.size
            tenant = value[pos:pos + size].decode(errors="replace")
            pos += size
            index = value[pos:pos + isize]
            return cover, BundleRecord(offset, stamp, tenant, value[pos + isize:], index)
        if kind in (b"D", b"P"):
            stamp, count = _DECIDED.unpack_from(value, pos)
            pos += _DECIDED.size
            verdicts = []
            for _ in range(count):
                tid, sampled, plen, frags, n = _VERDICT.unpack_from(value, pos)
                pos += _VERDICT.size
                policy = value[pos:pos + plen].decode(errors="replace")
                pos += plen
                ids = tuple(value[pos + i * SPAN_ID_SIZE:pos + (i + 1) * SPAN_ID_SIZE] for i in range(n))
                pos += n * SPAN_ID_SIZE
                verdicts.append(Verdict(tid, bool(sampled), policy, ids, frags))
            if pos != len(value):
                return None
            return cover, DecisionRecord(stamp, verdicts, kind == b"P")
        if kind == b"W" and len(value) == pos + _CLOCK.size:
            return cover, ClockRecord(*_CLOCK.unpack_from(value, pos))
    except struct.error:
        return None
    return None


def output_headers(tenant: str) -> list[tuple[str, bytes]]:
    """Headers of a sampled-trace record: routing forwards it unparsed when kotel.tenant is set."""
    headers = [("kotel.signal", b"traces"), ("kotel.schema", SCHEMA)]
    return [("kotel.tenant", tenant.encode()), *headers] if tenant else headers


def traces_of(request: ExportTraceServiceRequest) -> dict[bytes, list[bytes]]:
    """Trace id -> span ids of a request (an output record read back after a takeover)."""
    out: dict[bytes, list[bytes]] = {}
    for rs in request.resource_spans:
        for ss in rs.scope_spans:
            for span in ss.spans:
                out.setdefault(span.trace_id, []).append(span.span_id)
    return out


def join_fragments(parts: Iterable[bytes]) -> bytes:
    return join(parts)
