"""The Collector's config shape (receivers / processors / exporters / service.pipelines).

The agent section and the gateway section of a topology both use it, so the seed's YAML blocks
paste in unchanged. Which component types each section understands is decided here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from kotel.topology.base import Model, component_type
from kotel.topology.components import validate_components
from kotel.topology.exporters import (
    FileExporterConfig,
    KafkaExporterConfig,
    LokiExporterConfig,
    OtlpExporterConfig,
    OtlpHttpExporterConfig,
    OtlpReceiverConfig,
    PrometheusRemoteWriteConfig,
)
from kotel.topology.processors import (
    BatchConfig,
    DedupConfig,
    FilterConfig,
    GroupByAttrsConfig,
    MemoryLimiterConfig,
    ProbabilisticSamplerConfig,
    ResourceConfig,
    RoutingConfig,
)
from kotel.topology.tail_sampling import TailSamplingConfig

SIGNALS = ("traces", "metrics", "logs")

AGENT_RECEIVERS: dict[str, type[BaseModel]] = {"otlp": OtlpReceiverConfig}
AGENT_PROCESSORS: dict[str, type[BaseModel]] = {
    "batch": BatchConfig,
    "filter": FilterConfig,
    "probabilistic_sampler": ProbabilisticSamplerConfig,
    "resource": ResourceConfig,
    "groupbyattrs": GroupByAttrsConfig,
    "memory_limiter": MemoryLimiterConfig,
}
AGENT_EXPORTERS: dict[str, type[BaseModel]] = {
    "kafka": KafkaExporterConfig,
    "file": FileExporterConfig,
    "otlp": OtlpExporterConfig,
    "otlphttp": OtlpHttpExporterConfig,
}
GATEWAY_PROCESSORS: dict[str, type[BaseModel]] = {
    "dedup": DedupConfig,
    "tail_sampling": TailSamplingConfig,
    "routing": RoutingConfig,
    "filter": FilterConfig,
    "batch": BatchConfig,
}
SINK_EXPORTERS: dict[str, type[BaseModel]] = {
    "otlp": OtlpExporterConfig,
    "otlphttp": OtlpHttpExporterConfig,
    "prometheusremotewrite": PrometheusRemoteWriteConfig,
    "loki": LokiExporterConfig,
    "file": FileExporterConfig,
}
# Signals each sink type accepts, checked against the pipelines that use it.
SINK_SIGNALS: dict[str, tuple[str, ...]] = {
    "otlp": SIGNALS,
    "otlphttp": SIGNALS,
    "prometheusremotewrite": ("metrics",),
    "loki": ("logs",),
    "file": SIGNALS,
}


class Pipeline(Model):
    receivers: list[str] = []
    processors: list[str] = []
    exporters: list[str] = Field(min_length=1)


class ServiceConfig(Model):
    pipelines: dict[str, Pipeline] = Field(min_length=1)
    telemetry: dict[str, Any] = {}

    @field_validator("pipelines")
    @classmethod
    def _pipeline_ids(cls, pipelines: dict[str, Pipeline]) -> dict[str, Pipeline]:
        for pid in pipelines:
            if component_type(pid) not in SIGNALS:
                raise ValueError(f"pipeline {pid!r}: the part before '/' must be one of {', '.join(SIGNALS)}")
        return pipelines


def _check_refs(service: ServiceConfig | None, kinds: dict[str, dict[str, Any]]) -> None:
    if service is None:
        return
    for pid, pipe in service.pipelines.items():
        for kind, names in (("receivers", pipe.receivers), ("processors", pipe.processors),
                            ("exporters", pipe.exporters)):
            for name in names:
                if name not in kinds[kind]:
                    defined = ", ".join(sorted(kinds[kind])) or "none"
                    raise ValueError(
                        f"pipeline {pid!r} uses {kind[:-1]} {name!r}, which is not defined "
                        f"under {kind} (defined: {defined})"
                    )


class AgentConfig(Model):
    """The edge agent (seed §1.2): a Collector config whose exporters publish to Kafka."""

    receivers: dict[str, Any] = Field(min_length=1)
    processors: dict[str, Any] = {}
    exporters: dict[str, Any] = Field(min_length=1)
    extensions: dict[str, Any] = {}
    service: ServiceConfig
    agent_id: str = ""  # empty: the host name
    data_dir: str = "${KOTEL_HOME:-.kotel}/agent"
    metrics_endpoint: str = "127.0.0.1:8888"

    _receivers = field_validator("receivers", mode="before")(
        classmethod(lambda cls, v: validate_components(v, AGENT_RECEIVERS, "receiver"))
    )
    _processors = field_validator("processors", mode="before")(
        classmethod(lambda cls, v: validate_components(v, AGENT_PROCESSORS, "processor"))
    )
    _exporters = field_validator("exporters", mode="before")(
        classmethod(lambda cls, v: validate_components(v, AGENT_EXPORTERS, "exporter"))
    )

    def pipeline_receivers(self, pipeline_id: str) -> list[str]:
        """A pipeline that names no receiver takes every receiver (so the seed's §3.2 block works)."""
        return self.service.pipelines[pipeline_id].receivers or list(self.receivers)

    @model_validator(mode="after")
    def _refs(self) -> AgentConfig:
        _check_refs(self.service, {"receivers": self.receivers, "processors": self.processors,
                                   "exporters": self.exporters})
        return self


class GatewayConfig(Model):
    """The stream stages and sinks (seed §1.3): processors become stream stages, exporters sinks.

    Without ``service``, each signal runs the canonical chain dedup -> tail_sampling (traces) ->
    routing over the processors that are defined, so the seed's gateway block works as written.
    """

    receivers: dict[str, Any] = {}
    processors: dict[str, Any] = {}
    exporters: dict[str, Any] = {}
    service: ServiceConfig | None = None

    _processors = field_validator("processors", mode="before")(
        classmethod(lambda cls, v: validate_components(v, GATEWAY_PROCESSORS, "processor"))
    )
    _exporters = field_validator("exporters", mode="before")(
        classmethod(lambda cls, v: validate_components(v, SINK_EXPORTERS, "exporter"))
    )

    @field_validator("receivers")
    @classmethod
    def _kafka_only(cls, receivers: dict[str, Any]) -> dict[str, Any]:
        for name in receivers:
            if component_type(name) != "kafka":
                raise ValueError(f"receiver {name!r}: the gateway reads from Kafka; only 'kafka' is allowed")
        return receivers

    @model_validator(mode="after")
    def _refs(self) -> GatewayConfig:
        receivers = {"kafka": None, **self.receivers}
        _check_refs(self.service, {"receivers": receivers, "processors": self.processors,
                                   "exporters": self.exporters})
        routing = self.routing
        if routing is not None:
            used = [*routing.default_exporters, *(e for r in routing.table for e in r.exporters)]
            for name in used:
                if name not in self.exporters:
                    raise ValueError(
                        f"routing sends to exporter {name!r}, which is not defined under exporters"
                    )
        return self

    def processor_of(self, ptype: str) -> Any:
        for name, cfg in self.processors.items():
            if component_type(name) == ptype:
                return cfg
        return None

    @property
    def routing(self) -> RoutingConfig | None:
        return self.processor_of("routing")

    @property
    def tail_sampling(self) -> TailSamplingConfig | None:
        return self.processor_of("tail_sampling")

    @property
    def dedup(self) -> DedupConfig:
        return self.processor_of("dedup") or DedupConfig()

    def stage_chain(self, signal: Literal["traces", "metrics", "logs"]) -> list[str]:
        if self.service is not None:
            for pid, pipe in self.service.pipelines.items():
                if component_type(pid) == signal:
                    return [component_type(p) for p in pipe.processors]
            return []
        chain = ["dedup"]
        if signal == "traces" and self.tail_sampling is not None:
            chain.append("tail_sampling")
        if self.routing is not None:
            chain.append("routing")
        return chain
