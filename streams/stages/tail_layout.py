"""The tail stage's RocksDB layout and the plan types its state works with (see tail_state).

Keys of one partition's RocksDB:

- ``t`` + trace id: the pending trace (first seen, deadline, root seen, spans, bytes, fragments);
- ``f`` + trace id + n: its n-th fragment (tenant, framed resource entries), so nothing sits in the heap;
- ``d`` + deadline + trace id: the deadline index; due traces are a range scan, never a full scan;
- ``c`` + trace id: a decision (sampled, policy, when, the span ids emitted); ``s``/``n`` + sequence:
  the FIFO order of sampled / dropped decisions, which bounds the cache to the topology's sizes;
- one meta key: the last input offset applied, the output covered, counts and FIFO ends, and the
  decision clock last logged (streams.stages.tail_clock), where a new owner of the partition starts.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from kotel.topology.tail_sampling import TailSamplingConfig
from streams.stages.tail_core import NO_COVER, SPAN_ID_SIZE, Cover, Verdict

META_KEY = b"\x00tail-meta"
# applied input offset, cover (partition, offset), pending traces, sampled / dropped FIFO head and tail,
# decision clock ms (of the last W record applied)
META = struct.Struct(">qiqqqqqqq")
TRACE = struct.Struct(">qqqIII")  # first ms, deadline ms, root ms (-1: none), spans, bytes, fragments
DECISION = struct.Struct(">BqqB")  # sampled, decided ms, FIFO sequence, policy length
MS = struct.Struct(">q")
N = struct.Struct(">I")


class Limits(NamedTuple):
    decision_wait_ms: int
    root_wait_ms: int  # 0: no early decision after the root span
    max_spans: int
    max_bytes: int
    num_traces: int
    sampled_cache: int  # decisions kept per partition; 0: none
    dropped_cache: int

    @classmethod
    def of(cls, config: TailSamplingConfig, partitions: int) -> Limits:
        """The topology's limits; cache sizes and num_traces are for the stage, so split per partition."""
        def share(total: int) -> int:
            return -(-total // partitions) if total else 0

        return cls(int(config.decision_wait.total_seconds() * 1000),
                   int(config.decision_wait_after_root_received.total_seconds() * 1000),
                   config.max_spans_per_trace, config.max_bytes_per_trace, share(config.num_traces),
                   share(config.decision_cache.sampled_cache_size),
                   share(config.decision_cache.non_sampled_cache_size))


class Sampler(Protocol):
    def decide(self, trace_id: bytes, trace: Any) -> Any: ...  # a TraceData -> (sampled, policy)


@dataclass(slots=True)
class Meta:
    applied: int = -1
    cover: Cover = NO_COVER
    pending: int = 0
    s_head: int = 0
    s_tail: int = 0
    n_head: int = 0
    n_tail: int = 0
    stream_ms: int = 0


@dataclass(slots=True)
class Trace:
    first_ms: int
    deadline_ms: int
    root_ms: int = -1
    spans: int = 0
    size: int = 0
    frags: int = 0


class Decision(NamedTuple):
    sampled: bool
    decided_ms: int
    seq: int
    policy: str
    emitted: tuple[bytes, ...]


class Output(NamedTuple):
    """One record for the sampled topic: the spans of one trace that share a tenant."""

    trace_id: bytes
    tenant: str
    value: bytes
    spans: int


class Late(NamedTuple):
    sampled: bool
    spans: int
    lateness_ms: int


@dataclass
class Plan:
    """Changes not yet written, and what they mean for outputs and counters."""

    meta: Meta
    writes: dict[bytes, bytes | None] = field(default_factory=dict)
    reads: dict[bytes, bytes | None] = field(default_factory=dict)  # what the plan read, unchanged since
    outputs: list[Output] = field(default_factory=list)
    late: list[Late] = field(default_factory=list)
    truncated: Counter[str] = field(default_factory=Counter)  # spans cut off, by limit
    early: Counter[str] = field(default_factory=Counter)  # traces due before their wait, by limit
    buffered: int = 0  # spans added to pending traces
    verdicts: list[Verdict] = field(default_factory=list)
    decided: Counter[tuple[bool, str]] = field(default_factory=Counter)  # traces by (sampled, policy)
    decided_spans: Counter[tuple[bool, str]] = field(default_factory=Counter)
    skipped: bool = False  # an input offset already applied
    low: int | None = None  # the earliest deadline this plan indexes


def trace_key(tid: bytes) -> bytes:
    return b"t" + tid


def index_key(deadline_ms: int, tid: bytes) -> bytes:
    return b"d" + MS.pack(max(deadline_ms, 0)) + tid


def frag_key(tid: bytes, n: int) -> bytes:
    return b"f" + tid + N.pack(n)


def encode_decision(d: Decision) -> bytes:
    policy = d.policy.encode()[:255]
    return DECISION.pack(d.sampled, d.decided_ms, d.seq, len(policy)) + policy + b"".join(d.emitted)


def decode_decision(raw: bytes) -> Decision:
    sampled, decided, seq, plen = DECISION.unpack_from(raw)
    pos = DECISION.size + plen
    ids = tuple(raw[i:i + SPAN_ID_SIZE] for i in range(pos, len(raw), SPAN_ID_SIZE))
    return Decision(bool(sampled), decided, seq, raw[DECISION.size:pos].decode(errors="replace"), ids)


def encode_fragment(tenant: str, framed: bytes) -> bytes:
    raw = tenant.encode()[:255]
    return bytes([len(raw)]) + raw + framed


def decode_fragment(raw: bytes) -> tuple[str, bytes]:
    size = raw[0]
    return raw[1:1 + size].decode(errors="replace"), raw[1 + size:]
