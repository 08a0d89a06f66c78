"""Receiver and exporter configs (Collector names; kotel extensions are marked as such)."""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from kotel.topology.base import Model
from kotel.topology.durations import Duration

# --- receivers -------------------------------------------------------------------------------------


def _check_endpoint(value: str) -> str:
    _host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port (for example 0.0.0.0:4317), got {value!r}")
    return value


class GrpcServerConfig(Model):
    endpoint: str = "0.0.0.0:4317"
    max_recv_msg_size_mib: int = Field(4, gt=0)
    max_concurrent_streams: int = Field(0, ge=0)

    _endpoint = field_validator("endpoint")(classmethod(lambda cls, v: _check_endpoint(v)))


class HttpServerConfig(Model):
    endpoint: str = "0.0.0.0:4318"
    max_request_body_size: int = Field(20 * 1024 * 1024, gt=0)
    traces_url_path: str = "/v1/traces"
    metrics_url_path: str = "/v1/metrics"
    logs_url_path: str = "/v1/logs"

    _endpoint = field_validator("endpoint")(classmethod(lambda cls, v: _check_endpoint(v)))


class OtlpProtocols(Model):
    grpc: GrpcServerConfig | None = None
    http: HttpServerConfig | None = None

    @model_validator(mode="after")
    def _at_least_one(self) -> OtlpProtocols:
        if self.grpc is None and self.http is None:
            raise ValueError("enable at least one protocol (grpc or http)")
        return self


class OtlpReceiverConfig(Model):
    protocols: OtlpProtocols


# --- shared exporter options -----------------------------------------------------------------------


class TlsClientConfig(Model):
    insecure: bool = False
    insecure_skip_verify: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name_override: str | None = None


class RetryConfig(Model):
    """Exponential backoff; defaults are kotel's (seed §3.3), the option names the Collector's."""

    enabled: bool = True
    initial_interval: Duration = timedelta(seconds=1)
    max_interval: Duration = timedelta(seconds=30)
    max_elapsed_time: Duration = timedelta(minutes=5)
    multiplier: float = Field(2.0, ge=1.0)
    randomization_factor: float = Field(0.5, ge=0, le=1)


class CircuitBreakerConfig(Model):
    """kotel extension (seed §3.3): opens above a failure rate, probes again after ``open_duration``."""

    enabled: bool = True
    failure_rate_threshold: float = Field(0.5, gt=0, le=1)
    minimum_requests: int = Field(10, gt=0)
    window: Duration = timedelta(seconds=30)
    open_duration: Duration = timedelta(seconds=30)


class QueueConfig(Model):
    enabled: bool = True
    queue_size: int = Field(1000, gt=0)
    num_consumers: int = Field(10, gt=0)


class TenantHeader(Model):
    """kotel extension: the tenant header a backend wants (Loki/Tempo: the name; VictoriaLogs: a number)."""

    name: str = "X-Scope-OrgID"
    values: dict[str, str] = {}
    enabled: bool = True


class HttpClientBase(Model):
    endpoint: str = Field(min_length=1)
    tls: TlsClientConfig = TlsClientConfig()
    headers: dict[str, SecretStr] = {}
    compression: Literal["gzip", "snappy", "zstd", "none", ""] = "gzip"
    timeout: Duration = timedelta(seconds=5)
    retry_on_failure: RetryConfig = RetryConfig()
    sending_queue: QueueConfig = QueueConfig()
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()
    tenant_header: TenantHeader = TenantHeader()


# --- exporters -------------------------------------------------------------------------------------


SignalName = Literal["traces", "metrics", "logs"]


class OtlpExporterConfig(HttpClientBase):
    """OTLP/gRPC (Tempo, Jaeger, another Collector)."""

    balancer_name: Literal["pick_first", "round_robin"] = "round_robin"
    # kotel: as a gateway sink, which tenant topics it delivers (Tempo takes traces only).
    signals: list[SignalName] = ["traces"]


class OtlpHttpExporterConfig(HttpClientBase):
    signals: list[SignalName] = ["traces"]
    traces_endpoint: str | None = None
    metrics_endpoint: str | None = None
    logs_endpoint: str | None = None
    encoding: Literal["proto", "json"] = "proto"


class ResourceToTelemetry(Model):
    enabled: bool = False


class TargetInfo(Model):
    enabled: bool = True


class PrometheusRemoteWriteConfig(HttpClientBase):
    compression: Literal["snappy"] = "snappy"
    namespace: str = ""
    external_labels: dict[str, str] = {}
    resource_to_telemetry_conversion: ResourceToTelemetry = ResourceToTelemetry()
    target_info: TargetInfo = TargetInfo()
    add_metric_suffixes: bool = True
    send_metadata: bool = False
    # kotel extension: delta temporality has no Prometheus equivalent.
    delta_temporality: Literal["accumulate", "drop"] = "accumulate"


class LokiExporterConfig(HttpClientBase):
    compression: Literal["snappy", "gzip", "none"] = "snappy"
    encoding: Literal["protobuf", "json"] = "protobuf"
    # Stream labels stay few: chosen resource attributes plus the severity.
    label_resource_attributes: list[str] = ["service.name", "tenant", "env"]
    severity_label: bool = True


class FileRotation(Model):
    max_megabytes: int = Field(100, gt=0)
    max_days: int = Field(0, ge=0)
    max_backups: int = Field(100, ge=0)
    localtime: bool = False


class FileExporterConfig(Model):
    """The Collector's file exporter, plus Parquet (seed §3.2) and kotel's spill / archive roles."""

    path: str = Field(min_length=1)
    format: Literal["parquet", "json", "proto"] = "parquet"
    rotation: FileRotation = FileRotation()
    # kotel: in an agent pipeline beside `kafka`, `fallback` writes only while Kafka is unreachable.
    mode: Literal["fallback", "always"] = "fallback"
    max_disk_mib: int = Field(1024, gt=0)
    flush_interval: Duration = timedelta(seconds=1)


class KafkaProducerOptions(Model):
    max_message_bytes: int = Field(1_000_000, gt=1024)
    required_acks: Literal[-1, "all"] = -1
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "zstd"
    linger: Duration = timedelta(milliseconds=5)
    flush_max_messages: int = Field(10_000, gt=0)


class DegradeConfig(Model):
    """What the agent gives up above the high-water mark (seed §3.1), cheapest loss first."""

    sampling_percentage: float = Field(10, ge=0, le=100)
    drop_log_severity_below: Literal["TRACE", "DEBUG", "INFO", "WARN", "ERROR", ""] = "INFO"
    histogram_max_buckets: int = Field(10, ge=0)


class BackpressureConfig(Model):
    max_in_flight_mib: int = Field(64, gt=0)
    high_water_mark: float = Field(0.8, gt=0, lt=1)
    retry_after: Duration = timedelta(seconds=5)
    degrade: DegradeConfig = DegradeConfig()


class KafkaExporterConfig(Model):
    """The Collector's kafka exporter; record values are OTLP protobuf, keyed by service.instance.id."""

    brokers: list[str] = []  # empty: the topology's kafka.bootstrap_servers
    topic: str = ""  # empty: <prefix>.raw.<signal>
    encoding: Literal["otlp_proto"] = "otlp_proto"
    key_attribute: str = "service.instance.id"
    timeout: Duration = timedelta(seconds=5)
    producer: KafkaProducerOptions = KafkaProducerOptions()
    retry_on_failure: RetryConfig = RetryConfig()
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()
    backpressure: BackpressureConfig = BackpressureConfig()
