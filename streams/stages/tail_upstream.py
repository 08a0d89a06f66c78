"""Whether the dedup stage still has records to deliver to a deduped partition: fetch time is no evidence
for a partition whose upstream is behind.

A regrouper moves a caught-up source partition's clock past its last record by fetch time (tail_clock).
That holds only if nothing older is on its way, and when dedup has a backlog it is: after a broker outage
the spills' replay reached dedup as a backlog of ~90 s, which dedup works through a partition at a time
(a fetch brings up to 16 MiB of one partition), so the deduped partitions it had not reached yet were
"caught up" with nothing newer and their clocks ran on — 70 ERROR traces were decided before their
replayed spans arrived (loadtest outage run, 2026-11-26 23:27). `UpstreamWatch` therefore asks, once a
second, how far the dedup group has committed on the raw partitions feeding each deduped partition (dedup
writes raw partition r to deduped partition r % n); a deduped partition with any of them behind their end
is busy, and its clock moves by its records only. Commits trail processing by the commit interval, so a
partition counts as busy for a few seconds after its last record: decisions a little later, never early.
No dedup group (another producer writes the deduped topic), or no answer: nothing is known to be busy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from streams.app import aiokafka_options

if TYPE_CHECKING:  # importing it first at runtime would run into kotel.topology's import cycle
    from kotel.kafka.settings import KafkaSettings

log = logging.getLogger("kotel.tail")

WATCH_SECONDS = 1.0
# Records a partition may be behind and still count as idle: a transactional producer's last commit
# marker takes an offset no consumer commits past, and one record is handled in far less than a
# decision_wait.
_SLACK = 1


def busy_partitions(committed: Mapping[int, int | None], ends: Mapping[int, int], out_partitions: int
                    ) -> frozenset[int]:
    """Deduped partitions with a raw source partition whose committed offset is more than ``_SLACK``
    records short of its end.

    ``committed`` maps each raw partition to the dedup group's committed offset (None: none yet);
    an empty mapping (no such group) makes nothing busy.
    """
    if not committed or out_partitions <= 0:
        return frozenset()
    return frozenset(raw % out_partitions for raw, end in ends.items()
                     if end - (committed.get(raw) or 0) > _SLACK)


class UpstreamWatch:
    """Keeps `busy` current for one worker (see module doc)."""

    def __init__(self, kafka: KafkaSettings, group: str, raw_topic: str, raw_partitions: int,
                 out_partitions: int) -> None:
        self.kafka, self.group = kafka, group
        self.raw = [TopicPartition(raw_topic, p) for p in range(raw_partitions)]
        self.out_partitions = out_partitions
        self.busy: frozenset[int] = frozenset()

    async def run(self) -> None:
        options = aiokafka_options(self.kafka)
        while True:
            admin = AIOKafkaAdminClient(**options)
            ends = AIOKafkaConsumer(**options, group_id=None, enable_auto_commit=False)
            try:
                await admin.start()
                await ends.start()
                while True:
                    await self.look(admin, ends)
                    await asyncio.sleep(WATCH_SECONDS)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broker out of reach: keep what was known, start over
                log.info("tail sampling: the dedup group's progress is unknown: %s", exc)
                await asyncio.sleep(WATCH_SECONDS)
            finally:
                await ends.stop()
                await admin.close()

    async def look(self, admin: AIOKafkaAdminClient, ends: AIOKafkaConsumer) -> None:
        found = await admin.list_consumer_group_offsets(self.group, partitions=self.raw)
        committed = {tp.partition: (meta.offset if meta.offset >= 0 else None)
                     for tp, meta in found.items() if meta is not None}
        if committed and all(offset is None for offset in committed.values()):
            committed = {}  # the group has never committed: no dedup stage (yet)
        end = {tp.partition: offset for tp, offset in (await ends.end_offsets(self.raw)).items()}
        self.busy = busy_partitions(committed, end, self.out_partitions)
