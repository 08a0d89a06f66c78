"""The root of a topology file: one deployment of kotel, from agents to sinks."""

from __future__ import annotations

from pydantic import Field, model_validator

from kotel.kafka.settings import KafkaSettings
from kotel.kafka.topics import SIGNALS, TopicNames
from kotel.topology.base import Model
from kotel.topology.control import ControlPlaneConfig
from kotel.topology.pipelines import AgentConfig, GatewayConfig
from kotel.topology.topics import ResolvedTopic, TopicsConfig


class TenancyConfig(Model):
    """Seed §4.1's three label dimensions; ``attribute`` is the one the agent enforces."""

    attribute: str = Field("tenant", min_length=1)
    env_attribute: str = "env"
    region_attribute: str = "region"


class Topology(Model):
    version: int = Field(1, ge=1, le=1)
    name: str = "kotel"
    kafka: KafkaSettings = KafkaSettings()
    topics: TopicsConfig = TopicsConfig()
    tenancy: TenancyConfig = TenancyConfig()
    agent: AgentConfig | None = None
    gateway: GatewayConfig | None = None
    control_plane: ControlPlaneConfig = ControlPlaneConfig()

    @model_validator(mode="after")
    def _routing_attribute(self) -> Topology:
        routing = self.gateway.routing if self.gateway else None
        if routing is not None and routing.from_attribute != self.tenancy.attribute:
            raise ValueError(
                f"gateway routing reads from_attribute {routing.from_attribute!r} but the tenant label is "
                f"{self.tenancy.attribute!r} (tenancy.attribute); make them the same"
            )
        return self

    @property
    def topic_names(self) -> TopicNames:
        return TopicNames(self.topics.prefix)

    @property
    def tenants(self) -> list[str]:
        routing = self.gateway.routing if self.gateway else None
        return routing.tenants if routing else []

    def planned_topics(self) -> list[ResolvedTopic]:
        """Every topic this deployment needs, with its resolved settings."""
        names, t = self.topic_names, self.topics
        plan = []
        for signal in SIGNALS:
            plan.append(t.resolve(names.raw(signal), t.raw, signal))
            plan.append(t.resolve(names.deduped(signal), t.deduped, signal))
            plan.append(t.resolve(names.unrouted(signal), t.unrouted, signal))
            for tenant in self.tenants:
                plan.append(t.resolve(names.tenant(tenant, signal), t.tenant, signal))
        if self.gateway is not None and self.gateway.tail_sampling is not None:
            plan.append(t.resolve(names.sampled_traces, t.sampled))
        plan.append(t.resolve(names.deadletter, t.deadletter))
        return sorted(plan, key=lambda topic: topic.name)
