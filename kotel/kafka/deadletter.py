"""The dead-letter record's headers, one definition for every stage, sink and replay."""

from __future__ import annotations

from collections.abc import Iterable

REASON, TOPIC = "kotel.dlq.reason", "kotel.dlq.topic"
PARTITION, OFFSET = "kotel.dlq.partition", "kotel.dlq.offset"
DLQ_KEYS = frozenset({REASON, TOPIC, PARTITION, OFFSET})


def dead_letter_headers(reason: str, topic: str, partition: int, offset: int,
                        original: Iterable[tuple[str, bytes]] = ()) -> list[tuple[str, bytes]]:
    """The origin (topic, partition, offset) and the reason, then the record's own headers."""
    return [(REASON, reason.encode()), (TOPIC, topic.encode()), (PARTITION, str(partition).encode()),
            (OFFSET, str(offset).encode()), *((k, v) for k, v in original if k not in DLQ_KEYS)]
