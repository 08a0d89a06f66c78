"""Sinks: tenant topics into Prometheus, Loki, Tempo and the Parquet archive.

The pure translation layers (``prom_translate``, ``loki_translate``) turn OTLP requests into backend
payloads without any network or Kafka; the sink bindings around them own retries and commits.
"""
