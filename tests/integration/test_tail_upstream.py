"""The tail stage reads the dedup group's progress from a real broker (committed offsets vs. ends)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import GroupCoordinatorNotAvailableError
from aiokafka.structs import OffsetAndMetadata
from confluent_kafka import Producer

from kotel.topology import parse_topology
from streams.app import aiokafka_options
from streams.stages.tail_upstream import UpstreamWatch


async def test_busy_follows_the_dedup_groups_commits(kafka_bootstrap: str,
                                                     kafka_topic: Callable[..., str]) -> None:
    raw = kafka_topic("raw", partitions=4)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for partition, count in ((0, 3), (1, 5), (3, 3)):  # raw 2 stays empty
        for _ in range(count):
            producer.produce(raw, b"x", partition=partition)
    producer.flush(10)
    kafka = parse_topology(f'kafka: {{bootstrap_servers: "{kafka_bootstrap}"}}\n').kafka
    group = f"kotel-{uuid.uuid4().hex[:6]}-dedup"
    watch = UpstreamWatch(kafka, group, raw, 4, 2)
    options = aiokafka_options(kafka)
    admin, ends = AIOKafkaAdminClient(**options), AIOKafkaConsumer(**options, group_id=None)
    committer = AIOKafkaConsumer(**options, group_id=group, enable_auto_commit=False)
    await admin.start()
    await ends.start()
    await committer.start()
    try:
        for _ in range(60):  # a fresh broker creates its offsets topic on the first group request
            try:
                await watch.look(admin, ends)
                break
            except GroupCoordinatorNotAvailableError:
                await asyncio.sleep(0.5)
        assert watch.busy == frozenset()  # no such group: nothing known to be busy
        tps = [TopicPartition(raw, p) for p in range(4)]
        committer.assign(tps)
        await committer.commit({tps[0]: OffsetAndMetadata(3, ""), tps[1]: OffsetAndMetadata(1, "")})
        await watch.look(admin, ends)
        assert watch.busy == {1}  # raw 1 (-> deduped 1) is behind; raw 3 was never committed either
        await committer.commit({tps[1]: OffsetAndMetadata(5, ""), tps[3]: OffsetAndMetadata(2, "")})
        await watch.look(admin, ends)
        assert watch.busy == frozenset()
    finally:
        await committer.stop()
        await ends.stop()
        await admin.close()
