"""`topology apply`: create what is missing, report drift, never delete or shrink.

Adding partitions to an existing topic is reported but not done: it moves keys to other
partitions and breaks the per-``service.instance.id`` order that dedup and sinks rely on.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from kotel.topology.topics import ResolvedTopic


@dataclass
class TopicPlan:
    create: list[ResolvedTopic] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    drift: list[str] = field(default_factory=list)

    @property
    def has_changes(self) -> bool:
        return bool(self.create)

    def lines(self) -> list[str]:
        out = [
            f"create  {t.name}  partitions={t.partitions} replication={t.replication_factor} "
            + " ".join(f"{k}={v}" for k, v in sorted(t.config.items()))
            for t in self.create
        ]
        out += [f"drift   {d}" for d in self.drift]
        out += [f"ok      {name}" for name in self.unchanged]
        return out


def plan_topics(admin: AdminClient, wanted: Iterable[ResolvedTopic], timeout: float = 15.0) -> TopicPlan:
    wanted = list(wanted)
    metadata = admin.list_topics(timeout=timeout)
    plan = TopicPlan()
    existing = [t for t in wanted if t.name in metadata.topics]
    configs = _describe_configs(admin, [t.name for t in existing], timeout)
    for topic in wanted:
        meta = metadata.topics.get(topic.name)
        if meta is None:
            plan.create.append(topic)
            continue
        problems = []
        partitions = len(meta.partitions)
        if partitions != topic.partitions:
            problems.append(
                f"partitions: {partitions} in Kafka, {topic.partitions} in the topology"
                + (" (not changed: adding partitions moves keys)"
                   if partitions < topic.partitions
                   else " (not changed: Kafka cannot shrink a topic)")
            )
        replication = len(next(iter(meta.partitions.values())).replicas) if meta.partitions else 0
        if replication != topic.replication_factor:
            wanted_rf = topic.replication_factor
            problems.append(f"replication: {replication} in Kafka, {wanted_rf} in the topology")
        actual = configs.get(topic.name, {})
        for key, value in sorted(topic.config.items()):
            if actual.get(key) != value:
                problems.append(f"{key}: {actual.get(key)!r} in Kafka, {value!r} in the topology")
        if problems:
            plan.drift.append(f"{topic.name}: " + "; ".join(problems))
        else:
            plan.unchanged.append(topic.name)
    return plan


def _describe_configs(admin: AdminClient, names: list[str], timeout: float) -> dict[str, dict[str, str]]:
    if not names:
        return {}
    futures = admin.describe_configs([ConfigResource(ResourceType.TOPIC, n) for n in names],
                                     request_timeout=timeout)
    out: dict[str, dict[str, str]] = {}
    for resource, future in futures.items():
        entries = future.result(timeout=timeout)
        out[resource.name] = {k: str(v.value) for k, v in entries.items()}
    return out


def create_topics(admin: AdminClient, topics: list[ResolvedTopic], timeout: float = 30.0) -> list[str]:
    """Create topics; one that appeared meanwhile is fine. Returns the names created."""
    if not topics:
        return []
    futures = admin.create_topics(
        [
            NewTopic(t.name, num_partitions=t.partitions, replication_factor=t.replication_factor,
                     config=t.config)
            for t in topics
        ],
        request_timeout=timeout,
    )
    created = []
    for name, future in futures.items():
        try:
            future.result(timeout=timeout)
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise
    return created


def ensure_topic(admin: AdminClient, topic: ResolvedTopic, timeout: float = 30.0) -> bool:
    """Create ``topic`` if missing and wait until the cluster's metadata lists it; True if it was created.

    A worker must do this before it joins its consumer group: a topic created after the group's first
    assignment is left out of it until the next rebalance.
    """
    created = bool(create_topics(admin, [topic], timeout=timeout))
    deadline = time.monotonic() + timeout
    while topic.name not in admin.list_topics(timeout=timeout).topics:
        if time.monotonic() > deadline:
            raise TimeoutError(f"topic {topic.name} is not in the cluster's metadata after {timeout:.0f} s")
        time.sleep(0.1)
    return created
