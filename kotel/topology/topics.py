"""Topic settings per stage and signal: defaults <- stage group <- signal override."""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from pydantic import Field

from kotel.topology.base import Model
from kotel.topology.durations import Duration


class TopicSpec(Model):
    partitions: int | None = Field(None, gt=0)
    replication_factor: int | None = Field(None, gt=0)
    retention: Duration | None = None
    cleanup_policy: Literal["delete", "compact", "compact,delete"] | None = None
    config: dict[str, str] = {}


class TopicGroup(TopicSpec):
    traces: TopicSpec | None = None
    metrics: TopicSpec | None = None
    logs: TopicSpec | None = None


class ResolvedTopic(Model):
    name: str
    partitions: int
    replication_factor: int
    config: dict[str, str]


class TopicsConfig(Model):
    prefix: str = Field("kotel", pattern=r"^[A-Za-z0-9._-]{1,100}$")
    # Tenant topics appear when a route first needs them, if allowed; otherwise only via `topology apply`.
    create_tenant_topics_on_first_use: bool = False
    defaults: TopicSpec = TopicSpec(
        partitions=3, replication_factor=1, retention=timedelta(days=7), cleanup_policy="delete"
    )
    raw: TopicGroup = TopicGroup()
    deduped: TopicGroup = TopicGroup()
    sampled: TopicSpec = TopicSpec()
    tenant: TopicGroup = TopicGroup()
    unrouted: TopicGroup = TopicGroup()
    deadletter: TopicSpec = TopicSpec()

    def resolve(self, name: str, group: TopicSpec, signal: str | None = None) -> ResolvedTopic:
        layers: list[TopicSpec] = [self.defaults, group]
        if signal is not None and isinstance(group, TopicGroup):
            override = getattr(group, signal)
            if override is not None:
                layers.append(override)
        partitions, replication, retention, cleanup = 3, 1, timedelta(days=7), "delete"
        config: dict[str, str] = {}
        for layer in layers:
            partitions = layer.partitions or partitions
            replication = layer.replication_factor or replication
            retention = layer.retention if layer.retention is not None else retention
            cleanup = layer.cleanup_policy or cleanup
            config.update(layer.config)
        config.setdefault("retention.ms", str(int(retention.total_seconds() * 1000)))
        config.setdefault("cleanup.policy", cleanup)
        return ResolvedTopic(name=name, partitions=partitions, replication_factor=replication, config=config)
