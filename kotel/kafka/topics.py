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
