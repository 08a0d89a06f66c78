"""The edge agent's OTLP receivers: gRPC (:4317) and HTTP (:4318), both in front of an ExportHandler.

Each has ``async start()``, ``async stop(grace)`` and a ``port`` property; they only decode, validate
and answer, the handler decides and makes the data durable.
"""

from __future__ import annotations

from agents.contracts import ExportHandler
from agents.receivers.grpc_server import GrpcReceiver
from agents.receivers.http_server import HttpReceiver
from agents.telemetry import AgentMetrics
from kotel.topology.exporters import OtlpProtocols

__all__ = ["GrpcReceiver", "HttpReceiver", "build_receivers"]


def build_receivers(
    protocols: OtlpProtocols, handler: ExportHandler, metrics: AgentMetrics
) -> list[GrpcReceiver | HttpReceiver]:
    """One receiver per protocol the topology enables (not started)."""
    receivers: list[GrpcReceiver | HttpReceiver] = []
    if protocols.grpc is not None:
        receivers.append(GrpcReceiver(protocols.grpc, handler, metrics))
    if protocols.http is not None:
        receivers.append(HttpReceiver(protocols.http, handler, metrics))
    return receivers
