"""How an item's identity travels inside OTLP, and how it is read back from any topic or archive row.

- span: its ``span_id`` is ``run_tag (16 bits) | sequence (48 bits)``, big-endian. Span ids are what
  every trace backend indexes, they survive every stage unchanged, and reading one is far cheaper than
  scanning attributes. The trace id carries the trace's sequence number in its low 8 bytes.
- log record: the attribute ``loadtest.id`` (int), written first so a reader finds it at once.
- metric data point: a point has no room for a unique label (it would become a Prometheus series per
  point), so its identity is its series (attribute ``loadtest.series``, written first) and its time in
  milliseconds, which the generator keeps strictly increasing per series:
  ``key = time_ms * series_count + series``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import numpy as np
from google.protobuf.message import Message

from kotel.otlp import Signal, decode_protobuf
from kotel.otlp.signals import metric_data_points

ID_ATTRIBUTE = "loadtest.id"
SERIES_ATTRIBUTE = "loadtest.series"
_SEQ_BITS = 48
_SEQ_MASK = (1 << _SEQ_BITS) - 1


def span_id(run_tag: int, seq: int) -> bytes:
    return ((run_tag << _SEQ_BITS) | seq).to_bytes(8, "big")


def trace_id(prefix: bytes, run_tag: int, trace_seq: int) -> bytes:
    """Unique and random-looking, as W3C trace ids are: the Collector's probabilistic policy hashes them
    with FNV-1a, whose top bits barely move when only the last bytes vary (a counter there would make it
    keep all or none of a run's traces). Nothing decodes it; spans carry the identities."""
    return hashlib.blake2b(prefix + ((run_tag << _SEQ_BITS) | trace_seq).to_bytes(8, "big"),
                           digest_size=16).digest()


def metric_key(time_ms: int, series: int, series_count: int) -> int:
    return time_ms * series_count + series


def _attribute_int(attributes: Any, name: str) -> int | None:
    if attributes and attributes[0].key == name:
        return attributes[0].value.int_value
    for kv in attributes:
        if kv.key == name:
            return kv.value.int_value
    return None


def item_ids(signal: Signal, request: Message, run_tag: int, series_count: int) -> np.ndarray:
    """The identities of the generator's items in ``request`` (foreign items are skipped), as int64."""
    out: list[int] = []
    append = out.append
    if signal is Signal.TRACES:
        tag = run_tag
        for rs in request.resource_spans:  # type: ignore[attr-defined]
            for ss in rs.scope_spans:
                for span in ss.spans:
                    value = int.from_bytes(span.span_id, "big")
                    if value >> _SEQ_BITS == tag:
                        append(value & _SEQ_MASK)
    elif signal is Signal.LOGS:
        for rl in request.resource_logs:  # type: ignore[attr-defined]
            for sl in rl.scope_logs:
                for record in sl.log_records:
                    found = _attribute_int(record.attributes, ID_ATTRIBUTE)
                    if found is not None:
                        append(found)
    else:
        for rm in request.resource_metrics:  # type: ignore[attr-defined]
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    for point in metric_data_points(metric):
                        series = _attribute_int(point.attributes, SERIES_ATTRIBUTE)
                        if series is not None:
                            append(metric_key(point.time_unix_nano // 1_000_000, series, series_count))
    return np.fromiter(out, dtype=np.int64, count=len(out))


def ids_of_values(signal: Signal, values: Iterable[bytes], run_tag: int,
                  series_count: int) -> tuple[np.ndarray, np.ndarray]:
    """Identities of many records' items, and for each identity the index of its record."""
    chunks, owners = [], []
    for index, value in enumerate(values):
        try:
            ids = item_ids(signal, decode_protobuf(signal, value), run_tag, series_count)
        except ValueError:
            continue
        chunks.append(ids)
        owners.append(np.full(len(ids), index, dtype=np.int64))
    if not chunks:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(chunks), np.concatenate(owners)
