"""The control plane: anomaly detectors, actions and OpAMP remote configuration (seed §5)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from kotel.topology.base import Model
from kotel.topology.components import prefixed, validate_components
from kotel.topology.durations import Duration


class OpampConfig(Model):
    enabled: bool = False
    endpoint: str = "ws://127.0.0.1:4320/v1/opamp"
    heartbeat_interval: Duration = timedelta(seconds=30)


class Detector(Model):
    name: str = Field(min_length=1)
    metric: str = Field(min_length=1)
    method: Literal["ewma", "zscore", "threshold"] = "ewma"
    alpha: float = Field(0.3, gt=0, le=1)
    z_threshold: float = Field(3.0, gt=0)
    threshold: float | None = None
    action: Literal["lower_sampling", "memory_limit", "enable_spill", "rollback_config"]


class RemoteConfig(Model):
    """A configuration fragment pushed to agents; its components are checked like the agent's own."""

    priority: Literal["URGENT", "HIGH", "NORMAL", "LOW"] = "NORMAL"
    config: dict[str, Any] = Field(min_length=1)

    @field_validator("config", mode="before")
    @classmethod
    def _fragment(cls, value: Any) -> Any:
        # Imported late: pipelines imports this module's siblings, not the other way round.
        from kotel.topology.pipelines import AGENT_EXPORTERS, AGENT_PROCESSORS, AGENT_RECEIVERS

        if not isinstance(value, dict):
            raise ValueError("expected a mapping with processors, exporters or receivers")
        registries = {
            "processors": (AGENT_PROCESSORS, "processor"),
            "exporters": (AGENT_EXPORTERS, "exporter"),
            "receivers": (AGENT_RECEIVERS, "receiver"),
        }
        unknown = sorted(set(value) - set(registries))
        if unknown:
            raise ValueError(f"unknown section {unknown[0]!r}; expected processors, exporters or receivers")
        out, errors = {}, []
        for section, (registry, kind) in registries.items():
            if section in value:
                try:
                    out[section] = validate_components(value[section], registry, kind)
                except ValidationError as exc:
                    errors.extend(prefixed(exc, (section,)))
        if errors:
            raise ValidationError.from_exception_data("remote_config", errors)
        return out


class ControlPlaneConfig(Model):
    opamp: OpampConfig = OpampConfig()
    detectors: list[Detector] = []
    remote_config: RemoteConfig | None = None
