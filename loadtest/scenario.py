"""A load-test scenario: what to offer, through which pipeline, for how long, with which faults.

Scenarios are YAML files (``loadtest/scenarios/*.yaml``) validated here once, so a typo fails before
anything is started, with the file and the key's path in the message. The defaults in one place below
describe the smoke-sized workload; a scenario only states what it changes.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kotel.topology.durations import Duration, format_duration


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TraceShape(_Model):
    """Traces as a fleet of services calling each other; shares are per trace."""

    services: int = Field(4, ge=1, le=50)
    max_depth: int = Field(4, ge=1, le=10)
    max_fanout: int = Field(3, ge=1, le=10)
    max_spans: int = Field(24, ge=1, le=500)
    error_share: float = Field(0.05, ge=0, le=1)
    slow_share: float = Field(0.03, ge=0, le=1)
    slow_threshold_ms: int = Field(1000, gt=0)
    median_ms: float = Field(60.0, gt=0)
    health_share: float = Field(0.05, ge=0, le=1)
    late_share: float = Field(0.01, ge=0, le=1)
    late_by: Duration = timedelta(seconds=12)


class MetricShape(_Model):
    series: int = Field(400, ge=4, le=1_000_000)


class LogShape(_Model):
    # DEBUG, INFO, WARN, ERROR weights
    severity_weights: tuple[float, float, float, float] = (0.2, 0.55, 0.15, 0.1)
    trace_context_share: float = Field(0.7, ge=0, le=1)


class Rates(_Model):
    """Items per second offered for each signal (spans, data points, log records); 0 turns one off."""

    traces: float = Field(2000, ge=0)
    metrics: float = Field(2000, ge=0)
    logs: float = Field(2000, ge=0)


class Workload(_Model):
    rates: Rates = Rates()
    mode: Literal["open", "max"] = "open"
    # Open loop: "even" (each signal evenly spaced, the signals offset from each other), "aligned" (every
    # signal's request at the same instant) or "poisson" (exponential gaps): loadtest/generator/driver.py.
    arrivals: Literal["even", "aligned", "poisson"] = "even"
    items_per_request: int = Field(200, ge=1, le=10_000)
    max_in_flight: int = Field(256, ge=1)
    tenants: list[str] = Field(["tenant-a", "tenant-b", "tenant-c"], min_length=1)
    unknown_tenant: str = "tenant-unknown"
    unknown_share: float = Field(0.05, ge=0, le=1)
    instances_per_service: int = Field(3, ge=1, le=100)
    duplicate_share: float = Field(0.02, ge=0, le=1)
    traces: TraceShape = TraceShape()
    metrics: MetricShape = MetricShape()
    logs: LogShape = LogShape()
    seed: int = 42


class Probabilistic(_Model):
    sampling_percentage: float = Field(10, ge=0, le=100)


class TailSampling(_Model):
    decision_wait: Duration = timedelta(seconds=5)
    probabilistic: Probabilistic = Probabilistic()


class Pipeline(_Model):
    """The deployment under test; the runner turns it into a topology file."""

    target: Literal["grpc", "http", "kafka"] = "grpc"
    partitions: int = Field(3, ge=1, le=64)
    batch_timeout: Duration = timedelta(milliseconds=5)
    # The agent's Kafka producer linger (exporters.kafka.producer.linger, default 5 ms): a second batch
    # timeout after the batch processor's.
    kafka_linger: Duration = timedelta(milliseconds=5)
    send_batch_size: int = Field(1024, ge=1)
    dedup_window: Duration = timedelta(minutes=5)
    tail_sampling: TailSampling | None = None
    # The Parquet archive always receives every tenant: it is what the report reads back.
    backends: list[Literal["tempo", "prometheus", "loki"]] = []
    max_in_flight_mib: int = Field(64, gt=0)


class Fault(_Model):
    at: Duration
    duration: Duration
    kind: Literal["broker", "backend"]
    backend: Literal["tempo", "prometheus", "loki"] | None = None

    @model_validator(mode="after")
    def _backend_named(self) -> Fault:
        if self.kind == "backend" and self.backend is None:
            raise ValueError("a backend fault names its backend (tempo, prometheus or loki)")
        return self


class Checks(_Model):
    """What makes a run fail; speed is reported, never checked (the machine is shared)."""

    max_lost: int = Field(0, ge=0)
    max_sink_duplicates: int = Field(0, ge=0)
    sampling: bool = True


class Scenario(_Model):
    name: str = Field(pattern=r"^[a-z0-9-]{1,40}$")
    description: str = ""
    duration: Duration = timedelta(seconds=30)
    # Load before the measured run, at 50 items/s per signal (accounted, left out of latency); then the
    # run waits until it reaches the archive. Long enough, it measures a warm pipeline: a JVM broker
    # compiles its hot paths in its first minute (loadtest/results/scenarios.md, latency).
    warmup: Duration = timedelta(seconds=1)
    warmup_timeout: Duration = timedelta(seconds=120)
    drain_timeout: Duration = timedelta(seconds=120)
    workload: Workload = Workload()
    pipeline: Pipeline = Pipeline()
    faults: list[Fault] = []
    checks: Checks = Checks()

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        if self.warmup <= timedelta(0):
            raise ValueError(f"warmup must be positive (got {format_duration(self.warmup)}): the run "
                             "starts once warm-up load has reached the archive")
        for fault in self.faults:
            if fault.at + fault.duration > self.duration:
                raise ValueError(f"fault at {format_duration(fault.at)} lasting "
                                 f"{format_duration(fault.duration)} ends after the run "
                                 f"({format_duration(self.duration)})")
            if fault.kind == "backend" and fault.backend not in self.pipeline.backends:
                raise ValueError(f"fault stops backend {fault.backend!r}, which pipeline.backends lacks")
        if self.pipeline.target == "kafka" and any(f.kind == "broker" for f in self.faults):
            raise ValueError("a broker fault needs target grpc or http (the agent spills; a producer can't)")
        return self


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message names the file and the key."""


def parse_scenario(text: str, source: str = "<scenario>") -> Scenario:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: expected a mapping at the top level")
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise ScenarioError(f"{source}: {where}: {err['msg']}") from None


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_scenario(text, str(path))
