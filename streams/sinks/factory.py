"""Which deliverer serves which exporter type of the gateway section."""

from __future__ import annotations

from kotel.topology import Topology
from kotel.topology.base import component_type
from kotel.topology.exporters import (
    FileExporterConfig,
    LokiExporterConfig,
    OtlpExporterConfig,
    OtlpHttpExporterConfig,
    PrometheusRemoteWriteConfig,
)
from streams.sinks.runtime import Deliverer


class SinkConfigError(ValueError):
    pass


# `kotel sink tempo|prometheus|loki|archive`: the backend's name stands for its exporter type.
ALIASES = {"tempo": ("otlp", "otlphttp"), "prometheus": ("prometheusremotewrite",), "loki": ("loki",),
           "archive": ("file",), "parquet": ("file",)}


def resolve_name(topology: Topology, name: str) -> str:
    """An exporter name, or a backend alias that matches exactly one exporter of the gateway section."""
    exporters = topology.gateway.exporters if topology.gateway else {}
    if name in exporters or name not in ALIASES:
        return name
    matches = sorted(e for e in exporters if component_type(e) in ALIASES[name])
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise SinkConfigError(f"sink {name!r}: no exporter of type {' or '.join(ALIASES[name])} in the "
                              f"gateway section (defined: {', '.join(sorted(exporters)) or 'none'})")
    raise SinkConfigError(f"sink {name!r} is ambiguous: name one of {', '.join(matches)}")


def build_deliverer(topology: Topology, name: str) -> Deliverer:
    exporters = topology.gateway.exporters if topology.gateway else {}
    name = resolve_name(topology, name)
    if name not in exporters:
        defined = ", ".join(sorted(exporters)) or "none"
        raise SinkConfigError(f"sink {name!r} is not an exporter of the gateway section (defined: {defined})")
    config = exporters[name]
    kind = component_type(name)
    if kind == "file" and isinstance(config, FileExporterConfig):
        if config.format != "parquet":
            raise SinkConfigError(f"sink {name!r}: the archive writes Parquet; format {config.format!r} "
                                  "is not supported")
        from streams.sinks.archive import ParquetArchive

        return ParquetArchive(name, config)
    if isinstance(config, OtlpExporterConfig | OtlpHttpExporterConfig):
        from streams.sinks.otlp_sink import OtlpDeliverer

        return OtlpDeliverer(name, config, tuple(config.signals))
    if isinstance(config, PrometheusRemoteWriteConfig):
        from streams.sinks.http_sinks import PrometheusDeliverer

        return PrometheusDeliverer(name, config)
    if isinstance(config, LokiExporterConfig):
        from streams.sinks.http_sinks import LokiDeliverer

        return LokiDeliverer(name, config)
    raise SinkConfigError(f"sink {name!r}: exporter type {kind!r} has no sink in this version of kotel")
