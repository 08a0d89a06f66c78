"""Jaeger v2 (in-memory storage) as the OTLP trace backend of the e2e tests: Tempo's stand-in.

Jaeger v1.76's memory store keeps every trace under one tenant whatever X-Scope-OrgID says, so tenant
headers cannot be checked through it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from loadtest.servers import (
    HOST,
    ServerError,
    ServerProcess,
    accepts_connections,
    free_ports,
    http_request,
)
from loadtest.servers.build import JAEGER, ensure_built

CONFIG = Path(__file__).parent / "jaeger" / "config.yaml"


class JaegerServer(ServerProcess):
    """Jaeger v2 with OTLP gRPC and HTTP receivers; traces live in memory, so stop() forgets them."""

    name = "jaeger"

    def __init__(self, workdir: Path, binary: Path | None = None, max_traces: int = 100_000) -> None:
        super().__init__(workdir)
        self.binary = binary or ensure_built(JAEGER)[0]
        self.max_traces = max_traces
        self.otlp_grpc_port, self.otlp_http_port, self.query_http_port, self.query_grpc_port = free_ports(4)

    @property
    def otlp_grpc_endpoint(self) -> str:
        """host:port for an OTLP gRPC exporter (plaintext)."""
        return f"{HOST}:{self.otlp_grpc_port}"

    @property
    def otlp_http_url(self) -> str:
        """Base URL of the OTLP/HTTP receiver; traces go to ``/v1/traces``."""
        return f"http://{HOST}:{self.otlp_http_port}"

    @property
    def query_url(self) -> str:
        return f"http://{HOST}:{self.query_http_port}"

    def command(self) -> list[str]:
        return [str(self.binary), "--config", str(CONFIG)]

    def environment(self) -> dict[str, str]:
        # The OTel SDK inside Jaeger reads OTEL_*; the caller's settings must not leak into it.
        env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
        env.update(
            KOTEL_JAEGER_MAX_TRACES=str(self.max_traces),
            KOTEL_JAEGER_OTLP_GRPC_PORT=str(self.otlp_grpc_port),
            KOTEL_JAEGER_OTLP_HTTP_PORT=str(self.otlp_http_port),
            KOTEL_JAEGER_QUERY_HTTP_PORT=str(self.query_http_port),
            KOTEL_JAEGER_QUERY_GRPC_PORT=str(self.query_grpc_port),
        )
        return env

    def ready(self) -> bool:
        # Receivers start after the query extension, so all three listeners are checked.
        try:
            query_up = http_request(f"{self.query_url}/api/v3/services", timeout=2)[0] == 200
        except OSError:
            return False
        receivers = (self.otlp_grpc_port, self.otlp_http_port)
        return query_up and all(accepts_connections(port) for port in receivers)

    def trace(self, trace_id_hex: str) -> dict[str, Any] | None:
        """The stored trace as OTLP JSON (``{"resourceSpans": [...]}``), or None when Jaeger has none."""
        status, body = http_request(f"{self.query_url}/api/v3/traces/{trace_id_hex}")
        if status == 404:
            return None
        if status != 200:
            raise ServerError(f"Jaeger trace {trace_id_hex} answered {status}: {body[:500]!r}")
        result: dict[str, Any] = json.loads(body)["result"]
        return result

    def spans(self, trace_id_hex: str) -> list[dict[str, Any]]:
        """Every span of the trace, flattened out of its resource and scope groups ([] when none)."""
        trace = self.trace(trace_id_hex) or {}
        return [
            span
            for resource_spans in trace.get("resourceSpans", [])
            for scope_spans in resource_spans.get("scopeSpans", [])
            for span in scope_spans.get("spans", [])
        ]
