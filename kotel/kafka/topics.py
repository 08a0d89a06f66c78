"""kotel's topic names, in one place (ARCHITECTURE.md, "Topic names")."""

from __future__ import annotations

from dataclasses import dataclass

SIGNALS = ("traces", "metrics", "logs")


@dataclass(frozen=True)
class TopicNames:
    prefix: str = "kotel"

    def raw(self, signal: str) -> str:
        return f"{self.prefix}.raw.{signal}"

    def deduped(self, signal: str) -> str:
        return f"{self.prefix}.deduped.{signal}"

    @property
    def sampled_traces(self) -> str:
        return f"{self.prefix}.sampled.traces"

    def tenant(self, tenant: str, signal: str) -> str:
        return f"{self.prefix}.tenant.{tenant}.{signal}"

    def unrouted(self, signal: str) -> str:
        return f"{self.prefix}.unrouted.{signal}"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}.deadletter"

    def stage_group(self, stage: str) -> str:
        """The consumer group (and Faust app id) of a stage's workers."""
        return f"kotel-{self.prefix}-{stage}"

    def sink_group(self, sink: str) -> str:
        """The consumer group of a sink: its exporter name with what Kafka would refuse replaced."""
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in sink)
        return f"kotel-{self.prefix}-sink-{safe}"
