"""What the dedup unit tests (test_dedup_core, test_dedup_wire) share: the spans they build and the
RocksDB window store they open, defined once so the two files test the same shapes and cannot drift."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import faust
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from streams.stages.dedup_store import IdentityStore, SeenTable

RES = {"service.name": "shop", "service.instance.id": "shop-1"}


def spans(*numbers: int, start: int = 1000, name: str = "op") -> list[Span]:
    """Span n: trace id n, span id n, start time ``start + n``."""
    return [Span(name=name, trace_id=n.to_bytes(16, "big"), span_id=n.to_bytes(8, "big"),
                 start_time_unix_nano=start + n, end_time_unix_nano=start + n + 5) for n in numbers]


@contextmanager
def seen_store(tmp_path: Path, partitions: int = 2) -> Iterator[IdentityStore]:
    """A 10 s window store on local RocksDB under ``tmp_path``, no broker needed.

    Its partitions are dropped on exit: their handles would otherwise keep the RocksDB files open.
    """
    app = faust.App("dedup-unit", store="rocksdb://", datadir=str(tmp_path))
    table = SeenTable(app, name="seen", window_ms=10_000, partitions=partitions, key_type=bytes,
                      value_type=bytes)
    try:
        yield table.store
    finally:
        table.store._parts.clear()
