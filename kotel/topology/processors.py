"""Processor configs, with the OpenTelemetry Collector's option names and defaults.

Defaults live here and only here; agents and stages read them from the validated model.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from pydantic import Field, field_validator, model_validator

from kotel.topology.base import Model, Percentage, TenantName
from kotel.topology.durations import Duration


class BatchConfig(Model):
    timeout: Duration = timedelta(milliseconds=200)
    send_batch_size: int = Field(8192, ge=0)
    send_batch_max_size: int = Field(0, ge=0)
    metadata_keys: list[str] = []
    metadata_cardinality_limit: int = Field(1000, ge=0)
    # kotel: a client is answered only once its data is durable, so a batch also goes out when its
    # oldest waiting export has waited this long; `timeout` alone could hold clients for seconds.
    max_ack_delay: Duration = timedelta(milliseconds=50)

    @model_validator(mode="after")
    def _max_not_below_size(self) -> BatchConfig:
        if self.send_batch_max_size and self.send_batch_max_size < self.send_batch_size:
            raise ValueError(
                f"send_batch_max_size ({self.send_batch_max_size}) must be 0 (no limit) "
                f"or >= send_batch_size ({self.send_batch_size})"
            )
        return self


ErrorMode = Literal["ignore", "silent", "propagate"]


def _check_ottl(conditions: list[str], context: str) -> list[str]:
    # Imported here: the OTTL compiler is only needed when a topology actually has conditions.
    if not conditions:
        return conditions
    from kotel.ottl import compile_condition

    for index, text in enumerate(conditions):
        try:
            compile_condition(text, context)
        except ValueError as exc:
            raise ValueError(f"condition [{index}]: {exc}") from None
    return conditions


class FilterTraces(Model):
    span: list[str] = []
    spanevent: list[str] = []

    @field_validator("span")
    @classmethod
    def _span(cls, v: list[str]) -> list[str]:
        return _check_ottl(v, "span")

    @field_validator("spanevent")
    @classmethod
    def _spanevent(cls, v: list[str]) -> list[str]:
        if v:
            raise ValueError("spanevent conditions are not supported yet; use span conditions")
        return v


class FilterMetrics(Model):
    metric: list[str] = []
    datapoint: list[str] = []

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: list[str]) -> list[str]:
        return _check_ottl(v, "metric")

    @field_validator("datapoint")
    @classmethod
    def _datapoint(cls, v: list[str]) -> list[str]:
        return _check_ottl(v, "datapoint")


class FilterLogs(Model):
    log_record: list[str] = []

    @field_validator("log_record")
    @classmethod
    def _log(cls, v: list[str]) -> list[str]:
        return _check_ottl(v, "log")


class FilterConfig(Model):
    """The Collector's filterprocessor: an item is dropped when ANY of its conditions matches."""

    error_mode: ErrorMode = "propagate"
    traces: FilterTraces = FilterTraces()
    metrics: FilterMetrics = FilterMetrics()
    logs: FilterLogs = FilterLogs()


class ProbabilisticSamplerConfig(Model):
    sampling_percentage: Percentage = 0
    hash_seed: int = Field(0, ge=0, le=2**32 - 1)
    mode: Literal["hash_seed", "proportional", "equalizing"] = "hash_seed"
    # Logs: sample by trace id (default) or by a named attribute of the record.
    attribute_source: Literal["traceID", "record"] = "traceID"
    from_attribute: str = ""
    sampling_priority: str = ""
    fail_closed: bool = True

    @model_validator(mode="after")
    def _record_needs_attribute(self) -> ProbabilisticSamplerConfig:
        if self.attribute_source == "record" and not self.from_attribute:
            raise ValueError("attribute_source 'record' needs from_attribute (the attribute to hash)")
        if self.mode != "hash_seed":
            raise ValueError(f"mode {self.mode!r} is not supported yet; use 'hash_seed'")
        return self


class ResourceAction(Model):
    key: str = Field(min_length=1)
    action: Literal["insert", "update", "upsert", "delete", "hash"]
    value: str | int | float | bool | None = None
    from_attribute: str | None = None

    @model_validator(mode="after")
    def _value_source(self) -> ResourceAction:
        needs_value = self.action in ("insert", "update", "upsert")
        has_source = self.value is not None or self.from_attribute is not None
        if needs_value and not has_source:
            raise ValueError(f"action {self.action!r} needs 'value' or 'from_attribute'")
        if self.value is not None and self.from_attribute is not None:
            raise ValueError("give either 'value' or 'from_attribute', not both")
        return self


class ResourceConfig(Model):
    attributes: list[ResourceAction] = Field(min_length=1)


class GroupByAttrsConfig(Model):
    keys: list[str] = []


class MemoryLimiterConfig(Model):
    check_interval: Duration = timedelta(seconds=1)
    limit_mib: int = Field(0, ge=0)
    spike_limit_mib: int = Field(0, ge=0)
    limit_percentage: int = Field(0, ge=0, le=100)
    spike_limit_percentage: int = Field(0, ge=0, le=100)

    @model_validator(mode="after")
    def _limits(self) -> MemoryLimiterConfig:
        if self.check_interval <= timedelta(0):
            raise ValueError("check_interval must be greater than 0")
        if not self.limit_mib and not self.limit_percentage:
            raise ValueError("set limit_mib or limit_percentage")
        if self.limit_mib and self.spike_limit_mib >= self.limit_mib:
            raise ValueError(
                f"spike_limit_mib ({self.spike_limit_mib}) must be smaller than limit_mib ({self.limit_mib})"
            )
        return self


class RoutingRoute(Model):
    value: TenantName
    exporters: list[str] = Field(min_length=1)


class RoutingConfig(Model):
    """The Collector's routing processor; in kotel each table value is a tenant with its own topics."""

    from_attribute: str = "tenant"
    attribute_source: Literal["resource", "context"] = "resource"
    default_exporters: list[str] = []
    table: list[RoutingRoute] = Field(min_length=1)
    drop_resource_routing_attribute: bool = False

    @field_validator("table")
    @classmethod
    def _unique_values(cls, table: list[RoutingRoute]) -> list[RoutingRoute]:
        seen: set[str] = set()
        for route in table:
            if route.value in seen:
                raise ValueError(f"tenant {route.value!r} appears twice in the routing table")
            seen.add(route.value)
        return table

    @property
    def tenants(self) -> list[str]:
        return [r.value for r in self.table]


class DedupConfig(Model):
    """kotel's dedup stage (seed §2.1): identities remembered for ``window`` in RocksDB."""

    window: Duration = timedelta(minutes=5)
    signals: list[Literal["traces", "metrics", "logs"]] = ["traces", "metrics", "logs"]
