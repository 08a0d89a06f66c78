"""The Collector's probabilistic_sampler, hash_seed mode: one consistent keep/drop decision per trace id.

The decision is FNV-1a (32 bit) over the seed's four little-endian bytes followed by the 16-byte trace id,
masked to 14 bits, and kept when below the percentage scaled to 2**14 (computed in float32 and truncated,
as the Collector does), so every agent and Collector with the same ``hash_seed`` keeps the same traces and
a lower percentage keeps a subset of what a higher one keeps. Whole requests are hashed at once with numpy,
one vector step per id byte: a per-span Python loop would cost more than the rest of the pipeline.

Logs follow the Collector too: with ``attribute_source: traceID`` every record is hashed on its trace id,
an absent id counting as 16 zero bytes (the Collector "admits empty TraceIDs", so ``fail_closed`` does not
apply); with ``attribute_source: record`` the ``from_attribute`` value is hashed, and a record without it
has no randomness: dropped when ``fail_closed``, kept otherwise. ``sampling_priority`` names a log attribute
holding a percentage for that record (0 drops it). Not implemented: the span ``sampling.priority``
override (it needs a scan of every span's attributes, ~10x the cost of the hash decision) and the
``ot=th:...`` tracestate / ``sampling.threshold`` annotations the Collector adds to what it keeps.
"""

from __future__ import annotations

import json
import math
from base64 import b64encode
from decimal import Decimal
from typing import Any

import numpy as np
from google.protobuf.message import Message
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from agents.processors.filter import count_dropped, prune, remove_indices
from agents.telemetry import AgentMetrics
from kotel.otlp import Signal, count_items
from kotel.ottl.values import to_python
from kotel.topology.processors import ProbabilisticSamplerConfig

NUM_BUCKETS = 1 << 14
_MASK = NUM_BUCKETS - 1
_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193
_ID = 16
_SCALE = np.float32(NUM_BUCKETS / 100)


def scaled_rate(percentage: float) -> int:
    """Buckets (of 2**14) that are kept: the float32 product truncated toward zero, as the Collector."""
    pct = np.float32(min(max(percentage, 0.0), 100.0))
    return int(pct * _SCALE)


def fnv1a32(data: bytes, seed: int = 0) -> int:
    """FNV-1a of the seed's four little-endian bytes then ``data``: the reference for one value."""
    h = _FNV_OFFSET
    for byte in seed.to_bytes(4, "little") + data:
        h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return h


def trace_buckets(ids: bytes, seed: int) -> np.ndarray:
    """The 14-bit bucket of each 16-byte id in ``ids`` (concatenated), all hashed at once."""
    table = np.frombuffer(ids, dtype=np.uint8).reshape(-1, _ID).T.copy()  # one contiguous row per byte
    h = np.full(table.shape[1], fnv1a32(b"", seed), dtype=np.uint32)
    prime = np.uint32(_FNV_PRIME)
    for column in table:
        h ^= column
        h *= prime  # wraps modulo 2**32, which is FNV's arithmetic
    return h & np.uint32(_MASK)


def joined_ids(lists: list[Any]) -> bytes:
    """The trace ids of every item of ``lists``, each exactly 16 bytes (absent ids read as zeros)."""
    ids = b"".join([item.trace_id for items in lists for item in items])
    total = sum(len(items) for items in lists)
    if len(ids) == _ID * total:
        return ids
    # Only malformed ids get here (validation lets logs omit theirs): pad or cut each to 16 bytes.
    return b"".join([item.trace_id[:_ID].ljust(_ID, b"\0") for items in lists for item in items])


def keep_by_trace_id(lists: list[Any], seed: int, rate: int) -> np.ndarray:
    """True for each item (in order) whose trace id falls below ``rate`` buckets."""
    if not lists:
        return np.zeros(0, dtype=bool)
    return trace_buckets(joined_ids(lists), seed) < rate


def drop_unkept(lists: list[Any], keep: np.ndarray) -> int:
    """Delete the items whose ``keep`` flag is false (flags in the order of ``lists``); returns how many."""
    dropped = int(keep.size - np.count_nonzero(keep))
    if dropped:
        offset = 0
        for items in lists:
            size = len(items)
            remove_indices(items, np.flatnonzero(~keep[offset:offset + size]).tolist())
            offset += size
    return dropped


def item_lists(signal: Signal, request: Message) -> list[Any]:
    """Every scope's repeated items, in request order."""
    scope_field, item_field = signal.scope_field, signal.item_field
    return [getattr(scope, item_field)
            for entry in getattr(request, signal.resource_field) for scope in getattr(entry, scope_field)]


class ProbabilisticSampler:
    def __init__(
        self, config: ProbabilisticSamplerConfig, metrics: AgentMetrics, name: str = "probabilistic_sampler"
    ) -> None:
        self.name = name
        self._metrics = metrics
        self._seed = config.hash_seed
        self._record_attribute = config.from_attribute if config.attribute_source == "record" else ""
        self._priority = config.sampling_priority
        self._fail_closed = config.fail_closed
        self._percentage = 0.0
        self._rate = 0
        self.set_percentage(config.sampling_percentage)

    @property
    def percentage(self) -> float:
        return self._percentage

    def set_percentage(self, percentage: float) -> None:
        """Change the share kept at run time (backpressure, control plane); the next request uses it."""
        if not 0 <= percentage <= 100:
            raise ValueError(f"sampling percentage must be within 0..100, got {percentage}")
        self._percentage, self._rate = percentage, scaled_rate(percentage)

    def process(self, signal: Signal, request: Message) -> Message | None:
        if signal is Signal.METRICS:  # the Collector's sampler has no metrics pipeline either
            return request
        rate = self._rate  # read once: a concurrent set_percentage applies to a whole request
        by_record = signal is Signal.LOGS and bool(self._priority or self._record_attribute)
        if rate >= NUM_BUCKETS and not by_record:  # 100%: nothing to decide
            return request
        if rate == 0 and not (signal is Signal.LOGS and self._priority):
            count_dropped(self._metrics, signal, "sampled_out", count_items(request))
            return None
        lists = item_lists(signal, request)
        if signal is Signal.TRACES or not self._record_attribute:
            keep = keep_by_trace_id(lists, self._seed, rate)
        else:
            keep = self._keep_by_attribute(lists, rate)
        if signal is Signal.LOGS and self._priority:
            self._apply_priority(lists, keep)
        dropped = drop_unkept(lists, keep)
        if not dropped:
            return request
        count_dropped(self._metrics, signal, "sampled_out", dropped)
        return prune(signal, request)

    def _keep_by_attribute(self, lists: list[Any], rate: int) -> np.ndarray:
        key, seed, missing = self._record_attribute, self._seed, not self._fail_closed
        flags = []
        for items in lists:
            for record in items:
                value = _find(record.attributes, key)
                flags.append(missing if value is None else (fnv1a32(value_bytes(value), seed) & _MASK) < rate)
        return np.array(flags, dtype=bool)

    def _apply_priority(self, lists: list[Any], keep: np.ndarray) -> None:
        """A numeric priority attribute replaces the percentage for its record (0: never kept)."""
        key, index = self._priority, 0
        for items in lists:
            for record in items:
                value = _find(record.attributes, key)
                kind = value.WhichOneof("value") if value is not None else None
                if kind == "int_value" or kind == "double_value":
                    pct = getattr(value, kind)
                    if pct == 0:
                        keep[index] = False
                    elif pct > 0:
                        keep[index] = self._bucket(record) < scaled_rate(min(pct, 100))
                index += 1

    def _bucket(self, record: Any) -> int:
        """One record's bucket, or -1 (always kept once a priority asks for it) without randomness."""
        if not self._record_attribute:
            return int(trace_buckets(record.trace_id[:_ID].ljust(_ID, b"\0"), self._seed)[0])
        value = _find(record.attributes, self._record_attribute)
        return -1 if value is None else fnv1a32(value_bytes(value), self._seed) & _MASK


def _find(attributes: Any, key: str) -> AnyValue | None:
    for kv in attributes:
        if kv.key == key:
            return kv.value
    return None


def value_bytes(value: AnyValue) -> bytes:
    """The bytes the Collector hashes for an attribute: raw bytes, else pdata's ``AsString`` as UTF-8."""
    kind = value.WhichOneof("value")
    if kind == "bytes_value":
        return value.bytes_value
    if kind == "string_value":
        return value.string_value.encode()
    if kind == "bool_value":
        return b"true" if value.bool_value else b"false"
    if kind == "int_value":
        return str(value.int_value).encode()
    if kind == "double_value":
        return _go_float(value.double_value).encode()
    if kind is None:
        return b""
    return json.dumps(to_python(value), separators=(",", ":"), sort_keys=True,
                      default=lambda b: b64encode(b).decode()).encode()  # fmt: skip


def _go_float(f: float) -> str:
    """pdata's float text (ES6-style): fixed point between 1e-6 and 1e21, else shortest exponent form."""
    if not math.isfinite(f):
        return "json: unsupported value: " + ("NaN" if math.isnan(f) else ("+Inf" if f > 0 else "-Inf"))
    if f != 0 and not 1e-6 <= abs(f) < 1e21:
        text = repr(f)  # Python's shortest form, exponent spelled as Go's 'e' format: 1e-07, 1.5e+22
        return text[:-2] + text[-1] if text[-4:-1] == "e-0" else text
    text = format(Decimal(repr(f)), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text
