"""Records a sink has already handled, so a failed commit does not deliver them twice.

A sink commits offsets only after the backend accepted (at-least-once). When that commit fails — the
broker was unreachable, the group was rebalancing — the consumer later starts again from the last
committed offset and fetches records this process already delivered. Remembering, per partition, the
offset after the last record handled (accepted or dead-lettered) lets the sink skip exactly those, for
as long as the process lives; after a crash the backend's own idempotence is the remaining guard (Loki
drops an entry identical in stream, timestamp and line; Prometheus an identical sample; the archive's
journal skips what its files hold).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, TypeVar


class _Located(Protocol):
    @property
    def topic(self) -> str: ...

    @property
    def partition(self) -> int: ...

    @property
    def offset(self) -> int: ...


R = TypeVar("R", bound=_Located)


class HandledOffsets:
    """Per topic partition, the next offset after the last record this process handled."""

    def __init__(self) -> None:
        self._next: dict[tuple[str, int], int] = {}

    def handled(self, offsets: Mapping[tuple[str, int], int] | Iterable[tuple[tuple[str, int], int]]) -> None:
        """Records up to (excluding) each next offset were accepted or dead-lettered."""
        items = offsets.items() if isinstance(offsets, Mapping) else offsets
        for tp, after in items:
            if after > self._next.get(tp, -1):
                self._next[tp] = after

    def fresh(self, records: Sequence[R]) -> tuple[list[R], int]:
        """The records not handled yet, in order, and how many were skipped."""
        if not self._next:
            return list(records), 0
        known = self._next
        kept = [r for r in records if r.offset >= known.get((r.topic, r.partition), -1)]
        return kept, len(records) - len(kept)

    def __len__(self) -> int:
        return len(self._next)
