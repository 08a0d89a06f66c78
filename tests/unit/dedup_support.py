"""What the dedup unit tests (test_dedup_core, test_dedup_wire) share: the spans they build and the
RocksDB window store they open, defined once so the two files test the same shapes and cannot drift."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from opentelemetry.proto.trace.v1.trace_pb2 import Span

from streams.stages.dedup_store import SeenStore

RES = {"service.name": "shop", "service.instance.id": "shop-1"}


def spans(*numbers: int, start: int = 1000, name: str = "op") -> list[Span]:
    """Span n: trace id n, span id n, start time ``start + n``."""
    return [Span(name=name, trace_id=n.to_bytes(16, "big"), span_id=n.to_bytes(8, "big"),
                 start_time_unix_nano=start + n, end_time_unix_nano=start + n + 5) for n in numbers]


@contextmanager
def seen_store(tmp_path: Path) -> Iterator[SeenStore]:
    """A 10 s window store on local RocksDB under ``tmp_path``, no broker needed; closed on exit."""
    store = SeenStore(tmp_path / "seen", window_ms=10_000)
    try:
        yield store
    finally:
        store.close()
